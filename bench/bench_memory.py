"""Flat memory: peak RSS of the driver and every Ray worker at 1x vs 10x source size, and the cost of
the manifest tables and report at 70 000 rows.

    .venv/bin/python bench/bench_memory.py                 # both parts (tiny profile, local Ray)
    .venv/bin/python bench/bench_memory.py --skip-ray      # only the 70k-row tables/report part
    .venv/bin/python bench/bench_memory.py --skip-tables --small 40 --large 400

Part 1 runs the dataset job twice (tiny profile, RANDOM weights, local Ray), each in its own process,
on ``--small`` and ``--large`` photo-like PNGs; a sampler thread reads the RSS of the driver and of
every Ray worker process (``ray::...``) every 0.2 s. Printed: the peak per process role (driver, each
actor class, the CPU tasks) at both sizes and their ratio (target <= 1.2).

Part 2 writes a synthetic finished run of ``--rows`` samples (70 shards of 1000 by default; tiny
images, real shard and manifest formats, via tests/run_factory.py) and times ``write_manifest_tables``
(``samples.parquet``, ``shards.parquet``, ``summary.json``) and ``build_report`` (``report.html``), each
in a fresh process, with that process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RANDOM_LINE = "RANDOM WEIGHTS: tiny profile; the dataset this builds is meaningless (memory and time only)."
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
JOB_CONFIG = {"shards": {"size": 20, "max_side": 256}, "ray": {"images_per_call": 4, "progress_interval_s": 600}}


# --------------------------------------------------------------------------------- part 1
def _role(cmdline: str) -> str | None:
    m = re.search(r"ray::([A-Za-z_][\w.]*)", cmdline)
    return m.group(1) if m else None


def sample_rss(stop: threading.Event, peaks: dict[str, int], driver_pid: int) -> None:
    """Peak RSS per role (``driver``, ``ray::<name>``), max over processes of that role."""
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            try:
                info = proc.info
                if info["pid"] == driver_pid:
                    role = "driver"
                else:
                    role = _role(" ".join(info["cmdline"] or []))
                    if role is None or role == "IDLE":
                        continue
                rss = info["memory_info"].rss
            except (psutil.Error, TypeError):
                continue
            peaks[role] = max(peaks.get(role, 0), rss)
        stop.wait(0.2)


def job_run(n: int, work: Path, tiny: Path) -> dict:
    """(In a subprocess.) Run the job on ``n`` images; return peak RSS per role in MiB."""
    os.environ.update(ENV)
    os.environ["SUBJECT_FFHQ_TINY_MODELS"] = str(tiny)
    import io

    import ray

    from datagen.config import load_profile
    from ray_jobs.job import BuildRequest, run_build

    source = make_source(work / f"source-{n}", n)
    out = work / f"out-{n}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, peaks, os.getpid()), daemon=True)
    ray.init(num_cpus=2, include_dashboard=False)
    sampler.start()
    t0 = time.monotonic()
    summary = run_build(BuildRequest(source=source, out=out, profile=load_profile("tiny", JOB_CONFIG),
                                     run_name="mem", manifests_root=out / "manifests"), out=io.StringIO())
    seconds = time.monotonic() - t0
    stop.set()
    sampler.join()
    ray.shutdown()
    peaks["driver"] = max(peaks.get("driver", 0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"images": n, "status": summary.status, "seconds": seconds,
            "peak_mib": {k: v / 2**20 for k, v in sorted(peaks.items())}}


def make_source(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = folder / f"{i:05d}.png"
        if not p.exists():
            yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
            base = np.stack([np.sin(xx / (20 + 5 * c) + i) * np.cos(yy / (25 + 3 * c)) for c in range(3)], -1)
            arr = np.clip(127 + 100 * base + rng.normal(0, 6, (240, 320, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(p)
    return folder


def ray_part(small: int, large: int, work: Path, tiny: Path) -> None:
    from fixtures.tiny_models import build_one

    for name in ("blip2", "mask2former", "open_clip", "sbert"):
        build_one(name, tiny)
    results = []
    for n in (small, large):
        cmd = [sys.executable, __file__, "--job-run", str(n), "--work", str(work), "--tiny-models", str(tiny)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the job on {n} images failed (Ray may not start on an overloaded machine)")
        results.append(json.loads(line[-1][4:]))
    a, b = results
    print(f"\npeak RSS per process role, tiny profile, local Ray (2 CPUs): {small} vs {large} images")
    print(f"| role | {small} images MiB | {large} images MiB | ratio (target <= 1.2) |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for role in sorted(set(a["peak_mib"]) | set(b["peak_mib"])):
        x, y = a["peak_mib"].get(role), b["peak_mib"].get(role)
        ratio = y / x if x and y else float("nan")
        worst = max(worst, ratio) if ratio == ratio else worst
        print(f"| {role} | {x or 0:.0f} | {y or 0:.0f} | {ratio:.2f} |")
    print(f"job time: {a['seconds']:.0f} s ({a['status']}) vs {b['seconds']:.0f} s ({b['status']}); "
          f"worst ratio {worst:.2f}: {'OK' if worst <= 1.2 else 'OVER TARGET'}")


# --------------------------------------------------------------------------------- part 2
def make_big_run(root: Path, rows: int, per_shard: int = 1000) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from run_factory import make_run

    shards = max(1, rows // per_shard)
    plan = [["w"] * per_shard for _ in range(shards)]
    return make_run(root, run="big", plan=plan, long_side=24)["run_dir"]


def table_step(step: str, run_dir: Path) -> dict:
    """(In a subprocess.) Time one step; return seconds and this process's peak RSS."""
    t0 = time.perf_counter()
    if step == "tables":
        from datagen.manifests.tables import write_manifest_tables

        out = write_manifest_tables(run_dir)
        sizes = {p.name: p.stat().st_size for p in (out.samples, out.shards, out.summary)}
    else:
        from datagen.report.page import build_report

        sizes = {"report.html": build_report(run_dir).stat().st_size}
    return {"step": step, "seconds": time.perf_counter() - t0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "bytes": sizes}


def tables_part(rows: int, work: Path) -> None:
    root = work / f"big-run-{rows}"
    run_dir = root / "manifests" / "big"
    if not (run_dir / "run.json").exists():
        t0 = time.perf_counter()
        subprocess.run(["rm", "-rf", str(root)], check=True)
        run_dir = make_big_run(root, rows)
        print(f"synthetic run of {rows} rows written in {time.perf_counter() - t0:.0f} s: {run_dir}")
    print(f"\nmanifest tables and report at {rows} rows (each step in a fresh process)")
    print("| step | seconds | peak RSS MiB | output |")
    print("|---|---:|---:|---|")
    for step in ("tables", "report"):
        cmd = [sys.executable, __file__, "--table-step", step, "--run-dir", str(run_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"step {step} failed")
        r = json.loads(line[-1][5:])
        out = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["bytes"].items())
        print(f"| {'samples.parquet + shards.parquet + summary.json' if step == 'tables' else 'report.html'} "
              f"| {r['seconds']:.1f} | {r['peak_mib']:.0f} | {out} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=40)
    ap.add_argument("--large", type=int, default=400)
    ap.add_argument("--rows", type=int, default=70_000)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-tables", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subject-ffhq-bench-memory")
    ap.add_argument("--tiny-models", type=Path, default=None)
    ap.add_argument("--job-run", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--table-step", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from datagen.config import tiny_models_dir

    tiny = (args.tiny_models or tiny_models_dir()).resolve()
    if args.job_run:
        print("MEM " + json.dumps(job_run(args.job_run, args.work, tiny)))
        return
    if args.table_step:
        print("STEP " + json.dumps(table_step(args.table_step, args.run_dir)))
        return
    print(RANDOM_LINE)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.skip_tables:
        tables_part(args.rows, args.work)
    if not args.skip_ray:
        ray_part(args.small, args.large, args.work, tiny)


if __name__ == "__main__":
    main()

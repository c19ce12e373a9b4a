"""Benchmark: the build's rate from a bucket (a local S3 server) against the same build from a local folder.

    .venv/bin/python bench/bench_bucket.py [--images 144] [--rounds 2]

Made with random weights (the tiny profile): the rates measure the plumbing (fetching, decoding, the
stages' data flow), not the models' output, which is meaningless.

The source is an img2dataset collection (WebDataset tars of photo-like 1024x768 JPEGs with their json
and alt-text), written once to a local folder and uploaded to a moto S3 server that this script starts
on 127.0.0.1 and stops at the end. Each build runs in its own subprocess (its own local Ray, the tiny
profile, shards written to a local folder); the two sources alternate round by round, so machine load
hits both alike. The rate is ``images_per_second`` of the streaming phase (``run.json``), after the
actors have loaded their models; ``load s/img`` is the load tasks' time per image (fetch + decode +
downscale). The S3 server runs on the same machine as the build, so on a small box it takes CPU the
build would otherwise have. Target: bucket / local >= 0.8.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = {"shards": {"size": 16, "max_side": 512}, "ray": {"images_per_call": 8, "progress_interval_s": 60}}
FIRST_LINE = "made with random weights (tiny profile): rates of the plumbing only, the models' output is meaningless"


def write_collection(folder: Path, n_images: int, per_tar: int = 24) -> None:
    """img2dataset's layout: ``NNNNN.tar`` of ``<key>.jpg``, ``<key>.json``, ``<key>.txt``."""
    from bench_pipeline import photo_like

    folder.mkdir(parents=True, exist_ok=True)
    for t in range(0, n_images, per_tar):
        with tarfile.open(folder / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in range(t, min(t + per_tar, n_images)):
                buf = io.BytesIO()
                photo_like(1024, 768, seed=500 + i).save(buf, format="JPEG", quality=90)
                key = f"{t // per_tar:05d}{i:04d}"
                members = {"jpg": buf.getvalue(), "txt": f"photo {i}".encode(),
                           "json": json.dumps({"url": f"https://example.com/{key}.jpg", "key": key}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def build_once(source: str, out: Path) -> dict:
    """(In a subprocess.) One build; its streaming rate from ``run.json``."""
    import ray

    from datagen.config import load_profile
    from ray_jobs.job import BuildRequest, run_build

    ray.init(include_dashboard=False)
    request = BuildRequest(source=source, out=out, profile=load_profile("tiny", CONFIG), run_name="bench",
                           manifests_root=out / "manifests")
    summary = run_build(request, out=io.StringIO())
    ray.shutdown()
    inv = json.loads((out / "manifests" / "bench" / "run.json").read_text())["invocations"][-1]
    return {"status": summary.status, "images": inv["images_processed"], "stream_seconds": inv["stream_seconds"],
            "images_per_second": inv["images_per_second"], "load_cpu_s": inv["cpu_seconds_per_image"]["load"]}


def run_build_subprocess(source: str, out: Path, env: dict[str, str]) -> dict:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, __file__, "--build-once", source, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BUILD ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"build from {source} failed")
    return json.loads(line[-1][6:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=144)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of one local and one bucket build (order alternates)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "subject-ffhq-bench-bucket")
    ap.add_argument("--build-once", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_once:
        print("BUILD " + json.dumps(build_once(args.build_once, args.out)))
        return
    print(FIRST_LINE)
    from datagen.config import tiny_models_dir
    from fixtures.tiny_models import build_one

    tiny = tiny_models_dir().resolve()
    for name in ("blip2", "mask2former", "open_clip", "sbert"):
        if not (tiny / name / ".complete").exists():
            build_one(name, tiny)
    source = args.work / f"collection-{args.images}"
    if not source.is_dir():
        write_collection(source, args.images)

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "SUBJECT_FFHQ_TINY_MODELS": str(tiny), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        import boto3
        import fsspec

        boto3.client("s3").create_bucket(Bucket="bench")
        fsspec.filesystem("s3").put(f"{source}/", "s3://bench/collection/", recursive=True)
        results: dict[str, list[dict]] = {"local folder": [], "bucket (moto, 127.0.0.1)": []}
        for r in range(args.rounds):
            pair = [("local folder", str(source)), ("bucket (moto, 127.0.0.1)", "s3://bench/collection")]
            for name, src in (pair if r % 2 == 0 else pair[::-1]):
                results[name].append(run_build_subprocess(src, args.work / "out", env))
    finally:
        server.stop()
    print_table(results, args.images)


def print_table(results: dict[str, list[dict]], n_images: int) -> None:
    print(f"\nbuild of {n_images} photo-like 1024x768 JPEGs (img2dataset tars), tiny profile, local Ray, "
          f"shards of {CONFIG['shards']['size']} stored at {CONFIG['shards']['max_side']} px")
    print(f"{'source':>26} {'runs':>5} {'images':>7} {'stream s':>9} {'images/s':>9} {'load s/img':>10}")
    print("-" * 71)
    rates = {}
    for name, runs in results.items():
        images = sum(r["images"] for r in runs)
        seconds = sum(r["stream_seconds"] for r in runs)
        rates[name] = images / seconds if seconds else float("nan")
        per_run = ", ".join(f"{r['images_per_second']:.2f}" for r in runs)
        load = sum(r["load_cpu_s"] for r in runs) / len(runs)  # the load task's seconds per image (fetch + decode)
        print(f"{name:>26} {len(runs):>5} {images:>7} {seconds:>9.1f} {rates[name]:>9.2f} {load:>10.4f}"
              f"   (images/s per run: {per_run})")
    local, bucket = rates.values()
    print(f"bucket / local rate: {bucket / local:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()

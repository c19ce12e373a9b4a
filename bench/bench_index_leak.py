"""The evaluation's leak check through a run's identity index, at scale, on synthetic faces.

    .venv/bin/python bench/bench_index_leak.py [--sizes 100000,1000000] [--subjects 30] [--shard-faces 10000]

Synthetic run (no model, no random weights involved: the embeddings are drawn, 128-d like dlib's
descriptor, at dlib's scale: ~0.9 between people, ~0.3 between two faces of one person, threshold
0.5): ``N`` faces in face tables of ``--shard-faces`` faces each, ``identities.parquet`` and a
``split.parquet`` (10% of the photos in the reserve). Of the ``--subjects`` reference faces, half are
new photos of people in the run (planted: their identity's centre plus face noise), half are people
not in it. Each size is checked two ways, side by side, each in a fresh process (so its peak resident
memory is its own):

* ``streamed``: :func:`training.evaluation.leak.index_leak_check` (the face tables read in batches of
  65 536 faces, hits joined with the index and the split);
* ``whole``: every embedding loaded at once (:func:`datagen.manifests.face_table.read_faces`) and one
  distance matrix, the simple way it replaces.

It prints the wall time, the process's peak resident memory (``VmHWM``; ``imports``: its resident
memory before the check, the libraries alone) and whether the planted subjects (and only they)
were flagged with their identity. The reference photos' own embedding is not timed here (dlib's cost
per face: ``bench/bench_identity_embedder.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIM, THRESHOLD, RESERVE = 128, 0.5, 0.1
CENTRE_SPREAD, FACE_SPREAD = 0.65, 0.3  # as bench_identities: ~0.9 between people, ~0.3 within one
PHOTOS_PER_IDENTITY = 4


def write_run(run: Path, n: int, shard_faces: int, seed: int = 0) -> np.ndarray:
    """A synthetic run of ``n`` faces (``PHOTOS_PER_IDENTITY`` photos per identity, one face per
    photo); returns the identity centres."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datagen.files import write_parquet_atomic
    from datagen.manifests.face_table import face_table_path
    from datagen.stages.identity import face_table_schema

    rng = np.random.default_rng(seed)
    people = -(-n // PHOTOS_PER_IDENTITY)
    centres = rng.standard_normal((people, DIM), dtype=np.float32) * (CENTRE_SPREAD / np.sqrt(DIM))
    identity = np.arange(n) // PHOTOS_PER_IDENTITY
    for start in range(0, n, shard_faces):  # one shard's faces at a time: the generator stays small
        ids = identity[start:start + shard_faces]
        x = centres[ids] + rng.standard_normal((len(ids), DIM), dtype=np.float32) * (FACE_SPREAD / np.sqrt(2 * DIM))
        keys = np.char.zfill(np.arange(start, start + len(ids)).astype(str), 8)
        m = len(ids)
        table = pa.table({"face": np.char.add(keys, "/0"), "key": keys, "n": np.zeros(m, np.int32),
                          "segment_id": np.ones(m, np.int32), "size": np.full(m, 120, np.int32),
                          "score": np.full(m, 0.99, np.float32),
                          "embedding": pa.ListArray.from_arrays(np.arange(0, m * DIM + 1, DIM, dtype=np.int32),
                                                                x.ravel())}, schema=face_table_schema())
        write_parquet_atomic(face_table_path(run, f"subjects-{start // shard_faces:05d}"), table)
    keys = np.char.zfill(np.arange(n).astype(str), 8)
    sizes = np.full(n, PHOTOS_PER_IDENTITY, np.int32)
    pq.write_table(pa.table({"face": np.char.add(keys, "/0"), "key": keys, "n": np.zeros(n, np.int32),
                             "segment_id": np.ones(n, np.int32), "size": np.full(n, 120, np.int32),
                             "identity": identity, "distance": np.zeros(n, np.float32), "identity_faces": sizes,
                             "identity_photos": sizes}), run / "identities.parquet")
    reserve = rng.random(people) < RESERVE  # whole identities, as the identity-safe split
    pq.write_table(pa.table({"key": keys, "split": np.where(reserve[identity], "test", "train")}), run / "split.parquet")
    (run / "identities.json").write_text(json.dumps({"embedder": "dlib", "threshold": THRESHOLD}))
    (run / "run.json").write_text(json.dumps({"config": {"identity": {"embedder": "dlib"}}}))
    np.save(run / "reserve.npy", reserve)
    return centres


def references(centres: np.ndarray, subjects: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors, planted identity or -1)``: half new photos of train-side people, half strangers."""
    rng = np.random.default_rng(seed)
    planted = rng.choice(len(centres), subjects // 2, replace=False)
    strangers = rng.standard_normal((subjects - len(planted), DIM), dtype=np.float32) * (CENTRE_SPREAD / np.sqrt(DIM))
    noise = rng.standard_normal((len(planted), DIM), dtype=np.float32) * (FACE_SPREAD / np.sqrt(2 * DIM))
    return np.concatenate([centres[planted] + noise, strangers]), np.r_[planted, np.full(len(strangers), -1)]


def memory_mb(field: str) -> float:
    """This process's ``VmHWM`` (peak) or ``VmRSS`` in MB: unlike ``ru_maxrss``, not inherited from the
    parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check(run: Path, way: str) -> dict:
    """One way of checking, in this (fresh) process: seconds, peak memory, what was flagged."""
    from datagen.config import IdentitySettings
    from datagen.manifests.face_table import read_faces
    from training.evaluation.leak import RunIndex, index_leak_check

    vectors = np.load(run / "references.npy")
    base = memory_mb("VmRSS")  # the imports
    refs = {f"s{i:02d}": vectors[i:i + 1] for i in range(len(vectors))}
    t = time.perf_counter()
    if way == "streamed":
        leak = index_leak_check(RunIndex(run, IdentitySettings(embedder="dlib"), "mtcnn", THRESHOLD), refs)
        found = {s["subject"]: [e["identity"] for e in s["identities"]] for s in leak["subjects"]}
        flagged = leak["flagged"]
    else:
        faces, x = read_faces(run)
        d = np.sqrt(np.maximum((x * x).sum(1)[:, None] + (vectors * vectors).sum(1)[None] - 2 * x @ vectors.T, 0))
        found = {name: sorted({int(f.split("/")[0]) // PHOTOS_PER_IDENTITY for f in
                               np.asarray(faces.column("face").to_pylist())[d[:, i] < THRESHOLD]})
                 for i, name in enumerate(refs) if (d[:, i] < THRESHOLD).any()}
        flagged = None
    return {"seconds": time.perf_counter() - t, "peak_mb": memory_mb("VmHWM"), "base_mb": base, "found": found,
            "flagged": flagged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--shard-faces", type=int, default=10_000)
    parser.add_argument("--check", nargs=2, metavar=("RUN", "WAY"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check(Path(args.check[0]), args.check[1])))
        return
    print("synthetic embeddings (drawn, no model): the leak check through a run's identity index\n")
    print(f"{'faces':>9} {'way':>9} {'write s':>8} {'check s':>8} {'peak MB':>8} {'imports':>8}  found (planted / strangers)")
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp)
            t = time.perf_counter()
            centres = write_run(run, n, args.shard_faces)
            written = time.perf_counter() - t
            vectors, planted = references(centres, args.subjects)
            np.save(run / "references.npy", vectors)
            reserve = np.load(run / "reserve.npy")
            for way in ("streamed", "whole"):
                out = subprocess.run([sys.executable, __file__, "--check", str(run), way], capture_output=True,
                                     text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                right = sum(r["found"].get(f"s{i:02d}") == [int(p)] for i, p in enumerate(planted) if p >= 0)
                wrong = sum(f"s{i:02d}" in r["found"] for i, p in enumerate(planted) if p < 0)
                note = f"{right}/{int((planted >= 0).sum())} planted found with their identity, {wrong} strangers hit"
                if r["flagged"] is not None:
                    expect = sorted(f"s{i:02d}" for i, p in enumerate(planted) if p >= 0 and not reserve[p])
                    note += f"; flagged = the train-side planted ones: {sorted(r['flagged']) == expect}"
                print(f"{n:>9} {way:>9} {written:>8.1f} {r['seconds']:>8.2f} {r['peak_mb']:>8.0f} {r['base_mb']:>8.0f}  {note}")


if __name__ == "__main__":
    main()

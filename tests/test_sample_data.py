"""The bundled sample: exact FFHQ-wild layout, true metadata, one duplicate, recorded provenance."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.sources.images import pixel_md5
from fixtures.bundled_photos import SampleExistsError, build_sample, sources_markdown

REPO = Path(__file__).resolve().parents[1]

# Field names of NVlabs' ffhq-dataset-v2.json (its README, "Metadata").
ITEM_KEYS = {"category", "metadata", "image", "thumbnail", "in_the_wild"}
METADATA_KEYS = {
    "photo_url",
    "photo_title",
    "author",
    "country",
    "license",
    "license_url",
    "date_uploaded",
    "date_crawled",
}
IMAGE_KEYS = {"file_url", "file_path", "file_size", "file_md5", "pixel_size", "pixel_md5", "face_landmarks"}
THUMBNAIL_KEYS = {"file_url", "file_path", "file_size", "file_md5", "pixel_size", "pixel_md5"}
WILD_KEYS = {
    "file_url",
    "file_path",
    "file_size",
    "file_md5",
    "pixel_size",
    "pixel_md5",
    "face_rect",
    "face_landmarks",
    "face_quad",
}


@pytest.fixture(scope="module")
def metadata(sample_source) -> dict:
    return json.loads((sample_source / "ffhq-dataset-v2.json").read_text())


def test_metadata_has_ffhq_field_names(metadata):
    assert len(metadata) >= 8
    for index, item in metadata.items():
        assert index.isdigit()
        assert set(item) == ITEM_KEYS, index
        assert set(item["metadata"]) == METADATA_KEYS, index
        assert set(item["image"]) == IMAGE_KEYS, index
        assert set(item["thumbnail"]) == THUMBNAIL_KEYS, index
        assert set(item["in_the_wild"]) == WILD_KEYS, index
        assert item["category"] == ("training" if int(index) < 60000 else "validation")
    assert {item["category"] for item in metadata.values()} == {"training", "validation"}


def test_files_follow_the_folder_rule(sample_source, metadata):
    folders = set()
    for index, item in metadata.items():
        i = int(index)
        rel = item["in_the_wild"]["file_path"]
        assert rel == f"in-the-wild-images/{i // 1000 * 1000:05d}/{i:05d}.png"
        assert (sample_source / rel).is_file()
        assert item["image"]["file_path"] == f"images1024x1024/{i // 1000 * 1000:05d}/{i:05d}.png"
        folders.add(Path(rel).parent.name)
    assert len(folders) >= 2
    indices = sorted(int(i) for i in metadata)
    assert indices != list(range(len(indices))), "indices should be non-contiguous"
    on_disk = sorted(
        p.relative_to(sample_source).as_posix() for p in (sample_source / "in-the-wild-images").rglob("*.png")
    )
    assert on_disk == sorted(item["in_the_wild"]["file_path"] for item in metadata.values())


def test_sizes_and_checksums_match_the_files(sample_source, metadata):
    modes = set()
    for index, item in metadata.items():
        wild = item["in_the_wild"]
        data = (sample_source / wild["file_path"]).read_bytes()
        assert wild["file_size"] == len(data), index
        assert wild["file_md5"] == hashlib.md5(data).hexdigest(), index
        with Image.open(sample_source / wild["file_path"]) as img:
            img.load()
            modes.add(img.mode)
            assert list(img.size) == wild["pixel_size"], index
            assert 400 <= max(img.size) <= 1200, index
            assert wild["pixel_md5"] == pixel_md5(img.convert("RGB")), index
            if img.mode == "RGB":  # NVlabs' own check in download_ffhq.py
                assert wild["pixel_md5"] == hashlib.md5(np.array(img)).hexdigest(), index
    assert modes == {"RGB", "L"}  # camera is stored grayscale so normalisation is exercised


def test_face_rect_and_quad_are_plausible(metadata):
    for index, item in metadata.items():
        wild = item["in_the_wild"]
        w, h = wild["pixel_size"]
        x0, y0, x1, y1 = wild["face_rect"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, index
        assert 40 <= x1 - x0 <= w / 2 and 40 <= y1 - y0 <= h / 2, index
        quad = np.array(wild["face_quad"])
        assert quad.shape == (4, 2)
        assert np.allclose(quad.mean(axis=0), [(x0 + x1) / 2, (y0 + y1) / 2])


def test_one_photo_appears_under_two_indices(metadata):
    by_md5: dict[str, list[str]] = {}
    for index, item in metadata.items():
        by_md5.setdefault(item["in_the_wild"]["pixel_md5"], []).append(index)
    repeated = [indices for indices in by_md5.values() if len(indices) > 1]
    assert repeated == [["3", "1003"]]
    a, b = metadata["3"]["in_the_wild"], metadata["1003"]["in_the_wild"]
    assert a["file_md5"] == b["file_md5"]
    assert a["face_rect"] != b["face_rect"]  # one copy per face, as in FFHQ-wild


def test_licences_and_authors_are_the_source_photos(metadata):
    # expected values written out here, from the photos' own sources (not read from the builder)
    authors = {"NASA", "Lav Varshney", "U.S. Navy (official photograph)"}
    licences = {"Public Domain", "Public Domain Dedication (CC0)", "United States Government Work"}
    urls = {"https://flic.kr/p/r9qvLn", "https://github.com/scikit-image/scikit-image/issues/3927",
            "http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg"}
    assert metadata["0"]["metadata"]["license"] == "Public Domain"
    assert metadata["0"]["metadata"]["author"] == "NASA"
    assert metadata["0"]["metadata"]["photo_url"] == "https://flic.kr/p/r9qvLn"
    assert metadata["1"]["metadata"]["license"] == "Public Domain Dedication (CC0)"
    assert metadata["1"]["metadata"]["author"] == "Lav Varshney"
    assert metadata["2"]["metadata"]["license"] == "United States Government Work"
    assert metadata["2"]["metadata"]["photo_url"] == "http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg"
    # the three-person composites credit all three photos
    for index in ("4", "60000"):
        meta = metadata[index]["metadata"]
        assert set(meta["author"].split("; ")) == authors
        assert set(meta["license"].split("; ")) == licences
        assert set(meta["photo_url"].split("; ")) == urls
    for item in metadata.values():
        assert set(item["metadata"]["license"].split("; ")) <= licences


def test_grace_hopper_origin_is_what_the_installed_file_says():
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        comment = img.info.get("comment", b"").decode()
    assert "http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg" in comment


def test_scikit_image_docstrings_state_the_licences():
    from skimage import data

    assert "public domain" in data.astronaut.__doc__
    assert "CC0 by the photographer (Lav Varshney)" in data.camera.__doc__


def test_sources_md_written_and_committed_copy_current(sample_source):
    text = sources_markdown()
    assert (sample_source / "SOURCES.md").read_text() == text
    assert (REPO / "fixtures" / "SOURCES.md").read_text() == text, (
        "fixtures/SOURCES.md is stale: regenerate it from fixtures.bundled_photos.sources_markdown()"
    )
    for expected in ("Public Domain", "NASA", "https://flic.kr/p/r9qvLn", "Lav Varshney",
                     "Public Domain Dedication (CC0)", "United States Government Work",
                     "http://commons.wikimedia.org/wiki/File:Grace_Hopper.jpg"):
        assert expected in text


def test_build_is_deterministic_and_rerunnable(sample_source, tmp_path):
    again = build_sample(tmp_path / "again")
    first = sorted(p.relative_to(sample_source) for p in sample_source.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (sample_source / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_refuses_to_overwrite_real_metadata(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "ffhq-dataset-v2.json").write_text('{"0": {}}')
    with pytest.raises(SampleExistsError, match="refusing to overwrite"):
        build_sample(tmp_path)
    assert (tmp_path / "ffhq-dataset-v2.json").read_text() == '{"0": {}}'
    assert main(["sample-data", str(tmp_path)]) == 1  # the command: one error line on stderr
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith("subject-ffhq sample-data: error: ") and "refusing to overwrite" in captured.err
    assert (tmp_path / "ffhq-dataset-v2.json").read_text() == '{"0": {}}'


def test_sample_data_command_rewrites_an_existing_sample(sample_source, tmp_path, capsys):
    from cli.main import main

    target = tmp_path / "s"
    shutil.copytree(sample_source, target)
    (target / "in-the-wild-images" / "00000" / "00000.png").write_bytes(b"damaged")
    assert main(["sample-data", str(target)]) == 0
    out = capsys.readouterr().out
    assert "wrote 12 images" in out
    assert "in-the-wild-images/01000/01003.png" in out
    assert "duplicate of 3" in out
    rel = "in-the-wild-images/00000/00000.png"
    assert (target / rel).read_bytes() == (sample_source / rel).read_bytes()

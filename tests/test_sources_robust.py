"""Sources: escaped non-UTF-8 names, what a folder source passes over, duplicates whose file is
missing (issue 11, points 2 and 3). No models, no Ray."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from datagen.files import write_json_atomic
from datagen.sources.names import escape_path, unescape_path
from datagen.sources.readers import open_source

LATIN = os.fsdecode(b"latin\xe9.png")  # the byte 0xE9 alone: not UTF-8


@pytest.mark.parametrize(
    ("raw", "recorded"),
    [
        (b"latin\xe9.png", "latin\\xe9.png"),
        (b"dir\xff/x\xfe\xfd.jpg", "dir\\xff/x\\xfe\\xfd.jpg"),
        (b"back\\slash.png", "back\\\\slash.png"),
        (b"lit\\xe9.png", "lit\\\\xe9.png"),  # a name with a literal backslash-x: not confused with a byte
        ("café 名前.png".encode(), "café 名前.png"),
        (b"plain.png", "plain.png"),
    ],
)
def test_escaped_names_round_trip_to_the_same_bytes(raw, recorded):
    name = os.fsdecode(raw)
    assert escape_path(name) == recorded
    recorded.encode("utf-8")  # valid UTF-8 text
    assert os.fsencode(unescape_path(recorded)) == raw


def test_unescape_refuses_a_stray_backslash():
    with pytest.raises(ValueError, match="not an escaped path"):
        unescape_path("a\\qb.png")


def test_json_manifests_hold_a_lone_surrogate_and_read_it_back(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"reason": f"load: {LATIN}: broken"})
    data = path.read_bytes()
    data.decode("utf-8")
    assert json.loads(data) == {"reason": f"load: {LATIN}: broken"}
    assert not list(tmp_path.glob("*.tmp-*"))


def _png(path: Path, size=(32, 24), colour=(10, 20, 30)) -> None:
    Image.new("RGB", size, colour).save(path, format="PNG")


def test_folder_source_records_a_non_utf8_name_escaped_and_opens_it(tmp_path):
    _png(tmp_path / LATIN)
    _png(tmp_path / "b.png", colour=(1, 2, 3))
    source = open_source(tmp_path)
    latin = {it.rel_path: it for it in source.items()}["latin\\xe9.png"]
    assert latin.path == str(tmp_path / LATIN) and Path(latin.path).is_file()
    assert latin.meta["photo_title"] == "latin\\xe9.png"
    assert os.fsencode(unescape_path(latin.rel_path)) == b"latin\xe9.png"


def test_folder_source_says_what_it_passed_over_and_why(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / ".hidden.png", colour=(9, 9, 9))
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "README").write_text("hello")
    (tmp_path / "x.png").mkdir()
    _png(tmp_path / "x.png" / "inner.png", colour=(5, 5, 5))
    (tmp_path / ".cache").mkdir()
    _png(tmp_path / ".cache" / "c.png", colour=(6, 6, 6))
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link loop: never walked
    os.mkfifo(tmp_path / "pipe.png")
    source = open_source(tmp_path)
    assert [it.rel_path for it in source.items()] == ["a.png", "x.png/inner.png"]
    assert {s["path"]: s["reason"] for s in source.skipped} == {
        ".cache": "hidden folder, not searched",
        ".hidden.png": "hidden file",
        "README": "not a supported image type (no extension; taken: .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff)",
        "anim.gif": "not a supported image type (extension '.gif'; taken: .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff)",
        "loop": "link to a folder, not followed",
        "notes.txt": "not a supported image type (extension '.txt'; taken: .jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff)",
        "pipe.png": "not a regular file",
        "x.png": "a folder named like an image (searched as a folder)",
    }


def test_an_empty_folder_error_says_what_was_passed_over(tmp_path):
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    from datagen.sources.items import SourceError

    with pytest.raises(SourceError, match=r"no image files found .*passed over 1: anim.gif \(not a supported image type"):
        open_source(tmp_path).items()


def test_a_duplicate_whose_file_is_missing_is_not_a_duplicate(sample_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(sample_source, source)
    items = {it.source_id: it for it in open_source(source).items()}
    assert items["1003"].duplicate_of == "3"  # same recorded pixel md5 as index 3
    Path(items["1003"].path).unlink()
    items = {it.source_id: it for it in open_source(source).items()}
    assert items["1003"].duplicate_of is None and items["3"].duplicate_of is None  # loaded: "file is missing"
    assert items["1003"].split == items["3"].split  # still one group for the split

    # the group's first file missing: the next copy that exists stands for the group
    shutil.rmtree(source)
    shutil.copytree(sample_source, source)
    Path(items["3"].path).unlink()
    items = {it.source_id: it for it in open_source(source).items()}
    assert items["3"].duplicate_of is None and items["1003"].duplicate_of is None

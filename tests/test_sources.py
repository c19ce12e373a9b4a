"""Source readers: provenance, duplicates, the held-out split, malformed metadata, image folders."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.sources.ffhq_wild import FFHQWildSource
from datagen.sources.image_folder import ImageFolderSource
from datagen.sources.images import ImageError, load_image
from datagen.sources.items import (
    DEFAULT_TEST_SIZE,
    SourceError,
    SourceItem,
    assign_duplicates_and_split,
    choose_test_groups,
    held_out_size,
)
from datagen.sources.readers import open_source


@pytest.fixture(scope="module")
def metadata(sample_source) -> dict:
    return json.loads((sample_source / "ffhq-dataset-v2.json").read_text())


@pytest.fixture(scope="module")
def items(sample_source) -> list[SourceItem]:
    return FFHQWildSource(sample_source).items()


def with_metadata(tmp_path: Path, data) -> Path:
    """A source root whose metadata file holds ``data`` (a str is written as-is)."""
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    text = data if isinstance(data, str) else json.dumps(data)
    (root / "ffhq-dataset-v2.json").write_text(text)
    return root


def split_of(items: list[SourceItem]) -> dict[str, str]:
    return {item.source_id: item.split for item in items}


# --------------------------------------------------------------------------- FFHQ-wild reader


def test_open_source_picks_the_ffhq_reader(sample_source):
    source = open_source(sample_source)
    assert isinstance(source, FFHQWildSource)
    assert source.name == "ffhq-wild"


def test_items_follow_metadata_order_and_folder_rule(items, metadata, sample_source):
    assert [item.source_id for item in items] == sorted(metadata, key=int)
    for item in items:
        index = int(item.source_id)
        assert item.key == f"{index:05d}"
        assert item.rel_path == metadata[item.source_id]["in_the_wild"]["file_path"]
        assert Path(item.path) == sample_source.resolve() / item.rel_path
        assert Path(item.path).is_file()
        folder, name = Path(item.rel_path).parts[-2:]
        assert folder == f"{index // 1000 * 1000:05d}"  # folder == index rounded down to 1000
        assert name == f"{item.key}.png"


def test_provenance_is_carried_per_item(items, metadata):
    for item in items:
        entry = metadata[item.source_id]
        for field in ("license", "license_url", "author", "photo_url", "photo_title", "country"):
            assert item.meta[field] == entry["metadata"][field], (item.source_id, field)
        assert item.meta["face_rect"] == entry["in_the_wild"]["face_rect"]
        assert item.meta["pixel_md5"] == entry["in_the_wild"]["pixel_md5"]
        assert item.meta["category"] == entry["category"]
        assert item.meta["index"] == int(item.source_id)
        assert item.meta["source"] == "ffhq-wild"
    by_id = {item.source_id: item for item in items}
    assert by_id["0"].meta["author"] == "NASA"
    assert by_id["1"].meta["license"] == "Public Domain Dedication (CC0)"
    assert by_id["2"].meta["license_url"] == "http://www.usa.gov/copyright.shtml"
    assert by_id["60000"].meta["category"] == "validation"


def test_metadata_pixel_md5_matches_the_decoded_file(items):
    for item in items:
        loaded = load_image(item, max_side=256, verify_md5=True)  # recomputes; raises on a mismatch
        assert loaded.pixel_md5 == item.meta["pixel_md5"] == item.group, item.source_id
        assert "pixel-md5 verified against metadata" in loaded.notes
        assert list(loaded.original_size) == item.meta["pixel_size"]
        assert max(loaded.image.size) == 256


def test_duplicates_found_by_pixel_md5(items):
    dups = {item.source_id: item.duplicate_of for item in items if item.duplicate_of is not None}
    assert dups == {"1003": "3"}
    by_id = {item.source_id: item for item in items}
    assert by_id["3"].duplicate_of is None
    assert by_id["3"].group == by_id["1003"].group
    assert len({item.group for item in items}) == len(items) - 1


def test_default_split_on_the_sample(items, sample_source):
    test = [item for item in items if item.split == "test"]
    assert len(test) == held_out_size(len(items)) == 1
    assert {item.split for item in items} == {"train", "test"}
    assert split_of(FFHQWildSource(sample_source).items()) == split_of(items)  # same on every read


def test_split_is_independent_of_listing_order(sample_source, metadata, tmp_path):
    keys = list(metadata)
    random.Random(7).shuffle(keys)
    root = with_metadata(tmp_path, {k: metadata[k] for k in keys})
    (root / "in-the-wild-images").symlink_to(sample_source / "in-the-wild-images")
    for test_size in (1, 3, 6):
        a = FFHQWildSource(sample_source, test_size=test_size).items()
        b = FFHQWildSource(root, test_size=test_size).items()
        assert [i.source_id for i in a] == [i.source_id for i in b]
        assert split_of(a) == split_of(b)
        assert [i.duplicate_of for i in a] == [i.duplicate_of for i in b]


@pytest.mark.parametrize("test_size", range(0, 13))
def test_split_is_leak_free_and_exact(sample_source, test_size):
    items = FFHQWildSource(sample_source, test_size=test_size).items()
    sides: dict[str, set[str]] = {}
    for item in items:
        sides.setdefault(item.group, set()).add(item.split)
    assert all(len(s) == 1 for s in sides.values()), "a duplicate group straddles train/test"
    assert sum(item.split == "test" for item in items) == test_size  # groups of 1 and 2 always fit
    by_id = {item.source_id: item for item in items}
    assert by_id["3"].split == by_id["1003"].split


def test_held_out_size_rule():
    assert held_out_size(0) == 0
    assert held_out_size(1) == 0
    assert held_out_size(2) == 1
    assert held_out_size(19) == 1
    assert held_out_size(20) == 2
    assert held_out_size(5_678) == 567
    assert held_out_size(12_345) == 1000
    assert held_out_size(70_000) == DEFAULT_TEST_SIZE == 1000
    assert held_out_size(50, test_size=7) == 7
    assert held_out_size(5, test_size=7) == 5
    with pytest.raises(ValueError):
        held_out_size(5, test_size=-1)


def test_choose_test_groups_ignores_order_and_never_overshoots():
    sizes = {f"g{i}": 1 + i % 3 for i in range(200)}
    shuffled = dict(random.Random(3).sample(list(sizes.items()), len(sizes)))
    for target in (0, 1, 2, 17, 50, 399):
        chosen = choose_test_groups(sizes, target)
        assert chosen == choose_test_groups(shuffled, target)
        assert sum(sizes[g] for g in chosen) == target


def test_split_of_a_group_does_not_depend_on_item_order(tmp_path):
    def item(i: int, group: str) -> SourceItem:
        (tmp_path / f"{i}.png").touch()  # a duplicate must exist to be recorded as one
        return SourceItem(str(i), f"{i:05d}", str(tmp_path / f"{i}.png"), f"{i}.png", group, "train", None, {})

    base = [item(i, f"g{i // 3}") for i in range(60)]  # groups of three
    ordered = assign_duplicates_and_split(base, test_size=9)
    shuffled = assign_duplicates_and_split(random.Random(1).sample(base, len(base)), test_size=9)
    assert [(i.source_id, i.split, i.duplicate_of) for i in ordered] == [
        (i.source_id, i.split, i.duplicate_of) for i in shuffled
    ]
    assert sum(i.split == "test" for i in ordered) == 9
    assert {i.duplicate_of for i in ordered if int(i.source_id) % 3} == {str(g * 3) for g in range(20)}


# --------------------------------------------------------------------------- malformed metadata


def good_entry(i: int) -> dict:
    return {"in_the_wild": {"file_path": f"in-the-wild-images/00000/{i:05d}.png"}, "metadata": {}}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            "{not json",
            "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)",
        ),
        ("", "not valid JSON"),
        ("[1, 2]", "found a JSON list"),
        ('"text"', "found a JSON str"),
        ("{}", "the metadata lists no images"),
        ({"0": good_entry(0), "1": {"metadata": {}}}, "item '1' has no 'in_the_wild' object"),
        ({"0": {"in_the_wild": {"file_size": 3}}}, "item '0' has no 'in_the_wild.file_path'"),
        ({"0": {"in_the_wild": {"file_path": ""}}}, "item '0' has no 'in_the_wild.file_path'"),
        ({"0": [1]}, "item '0' is a JSON list, not an object"),
        ({"x7": good_entry(0)}, "key 'x7' is not a decimal image index"),
        ({"0": {"in_the_wild": {"file_path": "../../etc/passwd"}}}, "points outside the source root"),
        ({"0": {"in_the_wild": {"file_path": "/etc/passwd"}}}, "points outside the source root"),
        ({"0": {**good_entry(0), "metadata": "x"}}, "'metadata' is a JSON str, not an object"),
        (
            {"0": {"in_the_wild": {"file_path": "a.png", "pixel_md5": "zz"}}},
            "in_the_wild.pixel_md5 'zz' is not an md5",
        ),
        (
            {"0": {"in_the_wild": {"file_path": "a.png", "face_rect": [1, 2]}}},
            "face_rect [1, 2] is not [x0, y0, x1, y1]",
        ),
        ({"7": good_entry(7), "007": good_entry(7)}, "keys '7' and '007' name the same index 7"),
    ],
)
def test_malformed_metadata_gives_one_clear_error(tmp_path, data, reason):
    root = with_metadata(tmp_path, data)
    source = open_source(root)
    with pytest.raises(SourceError) as info:
        source.items()
    message = str(info.value)
    assert str(root.resolve() / "ffhq-dataset-v2.json") in message
    assert reason in message, message


def test_all_problems_are_collected_into_one_error(tmp_path):
    data = {str(i): {"metadata": {}} for i in range(25)}
    data["3"] = good_entry(3)
    root = with_metadata(tmp_path, data)
    with pytest.raises(SourceError) as info:
        FFHQWildSource(root).items()
    message = str(info.value)
    assert "malformed FFHQ metadata, 24 problem(s)" in message
    assert "item '0' has no 'in_the_wild' object" in message
    assert "and 14 more" in message


def test_missing_metadata_or_root(tmp_path):
    with pytest.raises(SourceError, match="FFHQ metadata file not found"):
        FFHQWildSource(tmp_path)
    with pytest.raises(SourceError, match="source folder not found"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="not a folder"):
        open_source(tmp_path / "file.txt")


def test_listed_but_missing_image_stays_an_item_and_fails_on_load(sample_source, metadata, tmp_path):
    root = with_metadata(tmp_path, metadata)
    shutil.copytree(sample_source / "in-the-wild-images", root / "in-the-wild-images")
    (root / "in-the-wild-images" / "01000" / "01001.png").unlink()
    items = FFHQWildSource(root).items()
    assert len(items) == len(metadata)  # never dropped silently
    missing = next(item for item in items if item.source_id == "1001")
    with pytest.raises(ImageError, match=r"01001\.png: file is missing"):
        load_image(missing)


def test_metadata_without_pixel_md5_falls_back_to_file_md5_then_index(tmp_path):
    md5 = "0123456789abcdef0123456789abcdef"
    data = {
        "0": {"in_the_wild": {"file_path": "a.png", "file_md5": md5}},
        "1": {"in_the_wild": {"file_path": "b.png", "file_md5": md5.upper()}},
        "2": {"in_the_wild": {"file_path": "c.png"}},
    }
    root = with_metadata(tmp_path, data)
    for name in ("a.png", "b.png"):
        (root / name).touch()  # a duplicate must exist to be recorded as one
    items = FFHQWildSource(root).items()
    assert [i.group for i in items] == [f"file:{md5}", f"file:{md5}", "index:2"]
    assert [i.duplicate_of for i in items] == [None, "0", None]
    assert items[0].meta["license"] is None


# --------------------------------------------------------------------------- image folders


def write_image(path: Path, color: tuple[int, int, int], fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    write_image(root / "b" / "2.PNG", (1, 2, 3), "PNG")
    write_image(root / "a" / "1.jpg", (4, 5, 6))
    write_image(root / "a" / "sub" / "3.webp", (7, 8, 9))
    write_image(root / "c.bmp", (10, 11, 12))
    write_image(root / "d.tiff", (13, 14, 15))
    write_image(root / "e.jpeg", (16, 17, 18))
    (root / "z").mkdir()
    shutil.copyfile(root / "a" / "1.jpg", root / "z" / "copy-of-1.jpg")
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "x.png", (0, 0, 0))
    write_image(root / ".dotfile.png", (0, 0, 0))
    (root / "empty1.png").write_bytes(b"")
    (root / "empty2.png").write_bytes(b"")
    return root


def test_folder_reader_lists_images_recursively_in_sorted_order(photo_folder):
    source = open_source(photo_folder)
    assert isinstance(source, ImageFolderSource) and source.name == "folder"
    items = source.items()
    assert [i.rel_path for i in items] == [
        "a/1.jpg",
        "a/sub/3.webp",
        "b/2.PNG",
        "c.bmp",
        "d.tiff",
        "e.jpeg",
        "empty1.png",
        "empty2.png",
        "z/copy-of-1.jpg",
    ]
    assert [i.source_id for i in items] == [str(i) for i in range(9)]
    assert [i.key for i in items] == [f"{i:05d}" for i in range(9)]
    for item in items:
        assert Path(item.path) == photo_folder.resolve() / item.rel_path
        assert item.meta["license"] is None and item.meta["pixel_md5"] is None
        assert item.meta["source"] == "folder"


def test_folder_duplicates_by_file_content(photo_folder):
    items = {i.rel_path: i for i in ImageFolderSource(photo_folder).items()}
    assert items["z/copy-of-1.jpg"].duplicate_of == items["a/1.jpg"].source_id == "0"
    assert items["z/copy-of-1.jpg"].group == items["a/1.jpg"].group == items["a/1.jpg"].meta["file_md5"]
    # empty files are not duplicates of each other: each fails on load with its own reason
    assert items["empty2.png"].duplicate_of is None
    assert items["empty1.png"].group != items["empty2.png"].group
    with pytest.raises(ImageError, match=r"empty2\.png: empty file"):
        load_image(items["empty2.png"])
    assert sum(i.duplicate_of is not None for i in items.values()) == 1


def test_folder_split_is_leak_free(photo_folder):
    for test_size in range(0, 10):
        items = ImageFolderSource(photo_folder, test_size=test_size).items()
        by_path = {i.rel_path: i.split for i in items}
        assert by_path["a/1.jpg"] == by_path["z/copy-of-1.jpg"]
        assert sum(s == "test" for s in by_path.values()) == test_size


def test_folder_images_load(photo_folder):
    items = {i.rel_path: i for i in ImageFolderSource(photo_folder).items()}
    loaded = load_image(items["b/2.PNG"])
    assert tuple(np.asarray(loaded.image)[0, 0]) == (1, 2, 3)
    assert loaded.image.size == (8, 8)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="no image files found"):
        open_source(tmp_path).items()


def test_a_repeated_key_is_named_not_silently_collapsed(tmp_path, monkeypatch):
    import json

    from datagen.sources import ffhq_wild

    one = json.dumps(good_entry(7))
    root = with_metadata(tmp_path, "{" + f'"7": {one}, "7": {one}' + "}")  # the same key twice, as text
    with pytest.raises(SourceError, match="keys '7' and '7' name the same index 7"):
        open_source(root).items()

    # a well-formed file never takes the item-by-item path
    monkeypatch.setattr(ffhq_wild, "_streamed_entries", lambda where: pytest.fail("streamed a good file"))
    (tmp_path / "good").mkdir()
    good = with_metadata(tmp_path / "good", {"7": good_entry(7), "8": good_entry(8)})
    assert [it.source_id for it in open_source(good).items()] == ["7", "8"]


def test_an_image_folder_on_a_bucket_lists_and_loads_as_the_local_one(photo_folder, local_s3):
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("photos")
    clear_fs_cache()
    fsspec.filesystem("s3").put(f"{photo_folder}/", f"s3://{bucket}/mine/", recursive=True)
    local, remote = ImageFolderSource(photo_folder), open_source(f"s3://{bucket}/mine")
    assert isinstance(remote, ImageFolderSource)

    def listed(source):
        return [(i.rel_path, i.key, i.group, i.split, i.duplicate_of) for i in source.items()]

    assert listed(remote) == listed(local)
    assert remote.skipped == local.skipped and {s["path"] for s in remote.skipped} == {".dotfile.png", ".hidden", "notes.txt"}
    items = {i.rel_path: i for i in remote.items()}
    assert items["b/2.PNG"].path == f"s3://{bucket}/mine/b/2.PNG"
    assert tuple(np.asarray(load_image(items["b/2.PNG"]).image)[0, 0]) == (1, 2, 3)
    with pytest.raises(ImageError, match=r"empty2\.png: empty file"):
        load_image(items["empty2.png"])

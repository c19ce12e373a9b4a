"""img2dataset's WebDataset output as a source: tars written the way img2dataset lays them out
(``<key>.jpg|.png|.webp``, ``<key>.json``, optional ``<key>.txt``), with a corrupt member, a copy of
an image under another key and a key without an image. Listed locally and from a bucket (one ranged
read per image), then built with the tiny models and exported."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.export.registry import export
from datagen.shards.reader import read_shard
from datagen.sources.images import load_image, load_images
from datagen.sources.readers import open_source
from tests.run_factory import photo

# (tar, key, image name, format, alt-text or None, extra json); "corrupt": bytes that are no image
SAMPLES = [
    ("00000.tar", "000000000", "astronaut", "JPEG", "an astronaut with a flag", {"LICENSE": "CC-BY 4.0"}),
    ("00000.tar", "000000001", "coffee", "PNG", None, {}),
    ("00000.tar", "000000002", "corrupt", "JPEG", "broken", {}),
    ("00000.tar", "000000003", "astronaut", "PNG", "the same photo again", {}),  # a PNG of a JPEG: other pixels
    ("00001.tar", "000010000", "chelsea", "WEBP", "a cat", {"license": "cc0", "license_url": "https://x/cc0"}),
    ("00001.tar", "000010001", "coffee", "PNG", "coffee, copied", {}),  # the same pixels as 000000001
]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset(root: Path) -> dict[str, bytes]:
    """The tars, and each key's image bytes."""
    root.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    for tar_name in sorted({s[0] for s in SAMPLES}):
        with tarfile.open(root / tar_name, "w") as tar:
            for _, key, name, fmt, alt, extra in (s for s in SAMPLES if s[0] == tar_name):
                if name == "corrupt":
                    data = b"\xff\xd8\xff\xe0 not really a jpeg" * 10
                else:
                    buf = io.BytesIO()
                    photo(name, 96).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
                    data = buf.getvalue()
                images[key] = data
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
                _member(tar, f"{key}.{ext}", data)
                meta = {"url": f"https://example.com/{key}.{ext}", "key": key, "status": "success",
                        "caption": alt, **extra}
                _member(tar, f"{key}.json", json.dumps(meta).encode())
                if alt is not None:
                    _member(tar, f"{key}.txt", alt.encode())
            if tar_name == "00001.tar":
                _member(tar, "000010002.json", b'{"url": "https://example.com/gone.jpg", "status": "success"}')
        (root / tar_name.replace(".tar", "_stats.json")).write_text("{}")
    return images


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("img2dataset") / "laion-like"
    write_img2dataset(root)
    return root


def check_listing(source) -> dict[str, object]:
    items = {item.meta["source_key"]: item for item in source.items()}
    assert source.name == "img2dataset"
    assert list(items) == [s[1] for s in SAMPLES]  # tars in name order, samples in tar order
    assert [item.key for item in items.values()] == [f"{i:05d}" for i in range(len(SAMPLES))]
    assert items["000010001"].duplicate_of == items["000000001"].source_id  # the same pixels
    assert items["000000003"].duplicate_of is None  # a JPEG and a PNG of one photo are different pixels
    assert items["000000002"].meta["pixel_md5"] is None  # undecodable: its own group, fails at load
    first = items["000000000"].meta
    assert (first["source_tar"], first["photo_url"], first["license"], first["alt_text"]) == (
        "00000.tar", "https://example.com/000000000.jpg", "CC-BY 4.0", "an astronaut with a flag")
    assert (items["000010000"].meta["license"], items["000010000"].meta["license_url"]) == ("cc0", "https://x/cc0")
    assert items["000010000"].rel_path == "00001.tar/000010000.webp"
    assert items["000000001"].meta["alt_text"] is None  # no .txt and a null caption
    assert source.skipped == [{"path": "00001.tar/000010002", "reason": "no image member (jpg, jpeg, png, webp)"}]
    return items


def test_an_img2dataset_collection_is_listed_with_provenance_duplicates_and_every_sample(collection):
    items = check_listing(open_source(collection))
    loaded = load_image(items["000010000"], max_side=64)
    assert loaded.image.size == (64, 43) and loaded.original_size == photo("chelsea", 96).size
    with pytest.raises(ValueError, match=r"00000.tar:000000002: truncated or corrupt image data"):
        load_image(items["000000002"], max_side=64)


def test_a_broken_json_and_a_second_image_are_named_not_dropped_silently(tmp_path):
    from datagen import storage
    from datagen.sources.img2dataset import list_tar

    buf = io.BytesIO()
    photo("coffee", 32).save(buf, format="PNG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        _member(tar, "000000000.png", buf.getvalue())
        _member(tar, "000000000.json", b'{"url": "https://example.com/0.png", "LICENSE": ')  # cut short
        _member(tar, "000000001.png", buf.getvalue())
        _member(tar, "000000001.jpg", buf.getvalue())  # a second image of the same key
        _member(tar, "000000001.json", b'["not", "an", "object"]')
    samples, skipped = list_tar(storage.path(tmp_path / "00000.tar"))
    assert [s["key"] for _, s in samples] == ["000000000", "000000001"]  # both kept
    assert samples[1][1]["member"] == "000000001.png"
    reasons = {entry["path"]: entry["reason"] for entry in skipped}
    assert reasons.keys() == {"00000.tar/000000000.json", "00000.tar/000000001.jpg", "00000.tar/000000001.json"}
    assert reasons["00000.tar/000000000.json"].startswith("metadata is not a JSON object (")
    assert "kept without its url, licence and caption" in reasons["00000.tar/000000000.json"]
    assert reasons["00000.tar/000000001.jpg"] == "a second image of sample '000000001'; the first, 000000001.png, is used"


def test_an_img2dataset_collection_on_a_bucket_reads_each_image_with_one_ranged_read(collection, local_s3):
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("i2d")
    clear_fs_cache()
    fsspec.filesystem("s3").put(f"{collection}/", f"s3://{bucket}/laion/", recursive=True)
    items = check_listing(open_source(f"s3://{bucket}/laion"))
    want = load_image(open_source(collection).items()[4], max_side=64)
    got = load_image(items["000010000"], max_side=64)
    assert got.pixel_md5 == want.pixel_md5 and got.image.tobytes() == want.image.tobytes()
    # a load task's images fetched concurrently: in order, each result or its own error
    here = list(load_images(open_source(collection).items(), max_side=64))
    there = list(load_images(list(items.values()), max_side=64))
    assert [item.key for item, _ in there] == [item.key for item, _ in here] == [f"{i:05d}" for i in range(len(SAMPLES))]
    for (_, a), (_, b) in zip(here, there, strict=True):
        if isinstance(a, Exception):
            assert type(a) is type(b) and a.reason == b.reason and "truncated or corrupt image data" in b.reason
        else:
            assert (a.pixel_md5, a.image.tobytes()) == (b.pixel_md5, b.image.tobytes())
    assert sum(isinstance(r, Exception) for _, r in there) == 1  # the corrupt member alone


@pytest.mark.slow
def test_an_img2dataset_collection_builds_and_exports(collection, tiny_stage_pools, tiny_models_all, tmp_path,
                                                      monkeypatch):
    from ray_jobs.job import BuildRequest, run_build

    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_all))
    profile = load_profile("tiny", {"shards": {"size": 4, "max_side": 64}, "ray": {"images_per_call": 2}})
    request = BuildRequest(source=collection, out=tmp_path / "out", profile=profile, run_name="i2d",
                           manifests_root=tmp_path / "manifests", pools=tiny_stage_pools)
    summary = run_build(request)
    assert summary.status == "complete", summary
    entries = [json.loads(p.read_text()) for p in sorted((summary.run_dir / "shards").glob("*.json"))]
    status = {s["rel_path"]: (s["status"], s["reason"]) for e in entries for s in e["samples"]}
    assert len(status) == len(SAMPLES)  # every sample accounted for, once
    assert status["00000.tar/000000002.jpg"][0] == "failed"
    assert status["00000.tar/000000002.jpg"][1].startswith("load: 00000.tar/000000002.jpg: ")
    assert status["00001.tar/000010001.png"] == ("duplicate", "duplicate of source_id 1 (same image)")
    assert [k for k, (st, _) in status.items() if st == "written"] == [
        "00000.tar/000000000.jpg", "00000.tar/000000001.png", "00000.tar/000000003.png", "00001.tar/000010000.webp"]
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["source"]["skipped"] == [{"path": "00001.tar/000010002", "reason": "no image member (jpg, jpeg, png, webp)"}]
    records = {s.record.provenance.source_key: s.record for tar in sorted((tmp_path / "out" / "shards").glob("*.tar"))
               for s in read_shard(tar)}
    first = records["000000000"].provenance
    assert (first.source, first.source_tar, first.alt_text, first.license, first.photo_url) == (
        "img2dataset", "00000.tar", "an astronaut with a flag", "CC-BY 4.0", "https://example.com/000000000.jpg")
    assert records["000000000"].caption != first.alt_text  # our caption, the collection's alt-text beside it

    import datasets

    out = tmp_path / "hf"
    exported = export("hf", tmp_path / "out" / "shards", out)
    assert exported.exported == len(records)
    loaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    rows = {r["provenance"]["source_key"]: r for split in loaded.values() for r in split}
    assert rows["000010000"]["provenance"]["alt_text"] == "a cat" and rows["000010000"]["provenance"]["license"] == "cc0"

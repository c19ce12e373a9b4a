import hashlib
import tarfile

import numpy as np
import pytest
from PIL import Image
from skimage import data

from datagen.files import remove_stale_temps
from datagen.shards.reader import ShardError, read_shard
from datagen.shards.writer import ShardWriter
from tests.record_factory import two_person_sample


def _image(w=64, h=48):
    return Image.fromarray(data.astronaut()).resize((w, h))


def _write(path, keys=("00042", "00043")):
    samples = []
    with ShardWriter(path) as w:
        for k in keys:
            record, seg = two_person_sample(key=k)
            w.write(_image(), seg, record)
            samples.append((record, seg))
    return samples


def test_round_trip_is_exact(tmp_path):
    path = tmp_path / "subjects-00000.tar"
    written = _write(path)
    got = list(read_shard(path))
    assert [s.key for s in got] == ["00042", "00043"]
    for (record, seg), sample in zip(written, got, strict=True):
        assert sample.record == record
        assert sample.record.to_json() == record.to_json()
        assert sample.segment_map.dtype == np.uint16
        np.testing.assert_array_equal(sample.segment_map, seg)
        assert sample.image.mode == "RGB" and sample.image.size == (64, 48)
    names = tarfile.open(path).getnames()
    assert names == [f"{k}.{e}" for k in ("00042", "00043") for e in ("jpg", "seg.png", "json")]


def test_json_member_bytes_are_the_record_json(tmp_path):
    path = tmp_path / "subjects-00000.tar"
    written = _write(path)
    with tarfile.open(path) as tar:
        member = tar.extractfile("00042.json").read()
    assert member == written[0][0].to_json().encode()


def test_sixteen_bit_ids_survive(tmp_path):
    record, seg = two_person_sample()
    seg = seg.copy()
    # renumber segment 2 as 40000 to exercise the 16-bit range
    seg[seg == 2] = 40000
    record.segments[1].id = 40000
    record.unmatched_person_segments = [40000]
    record.scores.segment_ids = [1, 40000]
    path = tmp_path / "subjects-00001.tar"
    with ShardWriter(path) as w:
        w.write(_image(), seg, record)
    # the digest and size the manifest records, taken before the move (or upload)
    assert (w.sha256, w.bytes) == (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size)
    (sample,) = read_shard(path)
    assert sample.segment_map.max() == 40000
    np.testing.assert_array_equal(sample.segment_map, seg)


def test_same_samples_give_byte_identical_tars(tmp_path):
    a, b = tmp_path / "a" / "subjects-00000.tar", tmp_path / "b" / "subjects-00000.tar"
    _write(a)
    _write(b)
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()


def test_interrupted_write_leaves_no_finished_tar(tmp_path):
    path = tmp_path / "subjects-00000.tar"
    record, seg = two_person_sample()
    with pytest.raises(RuntimeError, match="killed"):
        with ShardWriter(path) as w:
            w.write(_image(), seg, record)
            raise RuntimeError("killed mid-shard")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_crashed_writer_leaves_only_a_temp_file_that_is_cleaned(tmp_path):
    path = tmp_path / "subjects-00000.tar"
    record, seg = two_person_sample()
    w = ShardWriter(path)
    w.write(_image(), seg, record)
    w._file.flush()  # a process killed here never reaches close()
    assert not path.exists()
    leftovers = list(tmp_path.glob("*.tar*"))
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name
    assert remove_stale_temps(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_mismatched_sizes_and_duplicate_keys_are_rejected(tmp_path):
    record, seg = two_person_sample()
    with pytest.raises(ShardError, match="segment map is 64x48"):
        with ShardWriter(tmp_path / "subjects-00000.tar") as w:
            w.write(_image(32, 32), seg, record)
    with pytest.raises(ShardError, match="written twice"):
        with ShardWriter(tmp_path / "subjects-00000.tar") as w:
            w.write(_image(), seg, record)
            w.write(_image(), seg, record)
    assert not (tmp_path / "subjects-00000.tar").exists()


def test_reader_names_a_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="shard not found"):
        list(read_shard(tmp_path / "nope.tar"))


def test_segment_maps_decode_to_the_ids_written_whatever_the_decoder():
    import io

    from datagen.shards.reader import decode_segment_map
    from datagen.shards.writer import encode_segment_map

    rng = np.random.default_rng(5)
    ids = rng.integers(0, 65536, (37, 53)).astype(np.uint16)  # every bit of 16 used
    ids[0, :3] = (0, 255, 256)
    data = encode_segment_map(ids)
    decoded = decode_segment_map(data)  # libspng: gray read as gray + alpha, gray kept
    assert decoded.dtype == np.uint16 and decoded.shape == (37, 53) and np.array_equal(decoded, ids)
    with Image.open(io.BytesIO(data)) as im:  # the same as Pillow's reading
        assert np.array_equal(np.asarray(im).astype(np.uint16), decoded)

    small = io.BytesIO()
    Image.fromarray((ids % 200).astype(np.uint8)).save(small, format="PNG")  # an 8-bit map is read too
    assert np.array_equal(decode_segment_map(small.getvalue()), (ids % 200).astype(np.uint16))

    rgb = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb, format="PNG")
    with pytest.raises(ValueError, match="segment map PNG has mode RGB, expected 16-bit grayscale"):
        decode_segment_map(rgb.getvalue())
    with pytest.raises((ValueError, OSError)):  # truncated: Pillow's error, as before
        decode_segment_map(data[: len(data) // 2])


def test_one_decode_and_check_of_a_samples_members(tmp_path):
    from datagen.shards.reader import TarSample, iter_members
    from datagen.shards.writer import encode_jpeg, encode_segment_map

    path = tmp_path / "subjects-00000.tar"
    _write(path, keys=("00042",))
    ((key, members),) = iter_members(path)
    sample = TarSample.of(path.name, key, members)
    decoded = sample.decode()
    assert sample.record() == decoded.record and sample.image_size() == decoded.image.size == (64, 48)
    np.testing.assert_array_equal(sample.segment_map(), decoded.segment_map)

    with pytest.raises(ShardError, match=r"subjects-00000.tar: sample 00042 lacks member\(s\) \['seg.png'\]"):
        TarSample.of(path.name, key, {k: v for k, v in members.items() if k != "seg.png"})
    with pytest.raises(ShardError, match="subjects-00000.tar: member 00043.json holds record key '00042'"):
        TarSample(path.name, "00043", members).record()
    with pytest.raises(ShardError, match="subjects-00000.tar: sample 00042: record: "):
        TarSample(path.name, key, {**members, "json": b"{}"}).record()
    with pytest.raises(ShardError, match="subjects-00000.tar: sample 00042: cannot identify image"):
        TarSample(path.name, key, {**members, "jpg": b"not a jpeg"}).image()
    small = TarSample(path.name, key, {**members, "jpg": encode_jpeg(_image(32, 32))})
    with pytest.raises(ShardError, match="sample 00042: image is 32x32 but its segment map is 64x48"):
        small.decode()
    seg = np.zeros((32, 32), np.uint16)
    with pytest.raises(ShardError, match="sample 00042: record says 64x48, image is 32x32"):
        TarSample(path.name, key, {**small.members, "seg.png": encode_segment_map(seg)}).decode()


def test_the_shard_temp_file_is_the_atomic_writers(tmp_path):
    from datagen.files import TMP_MARK

    path = tmp_path / "subjects-00000.tar"
    w = ShardWriter(path)
    assert TMP_MARK in w.tmp_path.name and w.tmp_path.parent == tmp_path and w.tmp_path.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []
    _write(path)
    assert (path.stat().st_mode & 0o777) == 0o644 and list(tmp_path.iterdir()) == [path]

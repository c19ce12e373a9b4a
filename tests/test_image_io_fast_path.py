"""The fast decode path (libspng for plain 8-bit RGB PNGs, torch for the downscale) gives Pillow's
pixels, and hands every file it cannot take to Pillow, so bad input is reported as before."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from datagen.sources import images as image_io
from datagen.sources.images import ImageError, load_image
from datagen.sources.items import SourceItem


def item_for(path) -> SourceItem:
    return SourceItem(source_id="0", key="00000", path=str(path), rel_path=path.name, group="g", split="train",
                      duplicate_of=None, meta={})


def photo(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, w, dtype=np.float64)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
    return np.clip(ramp + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def spng_calls(monkeypatch):
    """Counts the files the libspng path decoded."""
    calls = []
    real = image_io._spng_decode

    def counted(data):
        out = real(data)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(image_io, "_spng_decode", counted)
    return calls


def test_plain_rgb_png_is_decoded_by_libspng_with_pillows_pixels(tmp_path, spng_calls):
    arr = photo()
    path = tmp_path / "a.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a gAMA-free text chunk")
    Image.fromarray(arr).save(path, pnginfo=info)
    loaded = load_image(item_for(path), max_side=None)
    assert spng_calls == [True]
    assert np.array_equal(np.asarray(loaded.image), arr)
    import hashlib

    assert loaded.pixel_md5 == hashlib.md5(arr.tobytes()).hexdigest()
    assert loaded.notes == ("pixel-md5 computed",)


def test_gamma_chunk_is_not_applied(tmp_path, spng_calls):
    """Pillow ignores gAMA; so must the fast path (FFHQ's pixel_md5 is of the raw values)."""
    arr = photo(seed=1)
    path = tmp_path / "g.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    gama = struct.pack(">I", 4) + b"gAMA" + struct.pack(">I", 100000)
    gama += struct.pack(">I", zlib.crc32(b"gAMA" + struct.pack(">I", 100000)) & 0xFFFFFFFF)
    path.write_bytes(data[:33] + gama + data[33:])  # after the 8-byte signature and 25-byte IHDR
    loaded = load_image(item_for(path), max_side=None)
    assert spng_calls == [True]
    assert np.array_equal(np.asarray(loaded.image), arr)


def test_downscale_matches_pillows_bilinear_to_one_level(tmp_path, spng_calls):
    arr = photo(300, 400, seed=2)
    path = tmp_path / "big.png"
    Image.fromarray(arr).save(path)
    loaded = load_image(item_for(path), max_side=160)
    assert spng_calls == [True] and loaded.image.size == (160, 120)
    expected = np.asarray(Image.fromarray(arr).resize((160, 120), Image.Resampling.BILINEAR)).astype(int)
    diff = np.abs(np.asarray(loaded.image).astype(int) - expected)
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert "resized 400x300 -> 160x120" in loaded.notes


def test_other_pngs_go_to_pillow(tmp_path, spng_calls):
    for name, image in [
        ("gray.png", Image.fromarray(photo()[..., 0])),
        ("rgba.png", Image.fromarray(np.dstack([photo(), np.full((90, 120), 128, np.uint8)]))),
        ("pal.png", Image.fromarray(photo()).convert("P")),
    ]:
        image.save(tmp_path / name)
        loaded = load_image(item_for(tmp_path / name), max_side=None)
        assert loaded.image.mode == "RGB"
    assert spng_calls == []



def test_bad_idat_crc_is_refused_with_pillows_reason(tmp_path, spng_calls):
    path = tmp_path / "crc.png"
    Image.fromarray(photo()).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    data[idat + 4 + length // 2] ^= 0xFF  # flip a byte inside the compressed data: CRC and adler32 break
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        load_image(item_for(path), max_side=None)
    assert str(path) in str(info.value) and "truncated or corrupt image data" in str(info.value)
    assert spng_calls == [False]  # libspng refused it; Pillow gave the reason


def test_exif_png_goes_to_pillow_so_orientation_is_applied(tmp_path, spng_calls):
    arr = photo(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "exif.png"
    Image.fromarray(arr).save(path, exif=exif)
    loaded = load_image(item_for(path), max_side=None)
    assert loaded.image.size == (40, 60) and "exif-transposed (orientation 6)" in loaded.notes
    assert spng_calls == [False]  # the eXIf chunk sent it back to Pillow


def test_png_chunk_walk_finds_exif_anywhere_and_only_as_a_chunk():
    import struct
    import zlib

    from datagen.sources.images import _has_png_chunk

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\0" + b"eXIf" + b"\0" * 8))  # the bytes inside pixel data
    text = chunk(b"tEXt", b"Comment\0mentions eXIf")
    assert not _has_png_chunk(head + text + idat + chunk(b"IEND", b""), b"eXIf")  # no false hit
    assert _has_png_chunk(head + idat + chunk(b"eXIf", b"MM\0*") + chunk(b"IEND", b""), b"eXIf")  # after IDAT
    assert _has_png_chunk(head + chunk(b"eXIf", b"MM\0*") + idat + chunk(b"IEND", b""), b"eXIf")
    assert _has_png_chunk(head + idat, b"eXIf")  # no IEND: let Pillow look at it

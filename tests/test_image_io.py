"""Loading, validating and normalising source images: every kind of bad input has a known outcome."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.sources.images import MAX_PIXELS, ImageError, LoadedImage, load_image, pixel_md5
from datagen.sources.items import SourceItem


def item_for(path: Path, meta_md5: str | None = None) -> SourceItem:
    """An image-folder item (no metadata md5), or with ``meta_md5`` an FFHQ-wild-like one."""
    return SourceItem(
        source_id="0",
        key="00000",
        path=str(path),
        rel_path=path.name,
        group="g",
        split="train",
        duplicate_of=None,
        meta={"pixel_md5": meta_md5},
    )


def load(path: Path, meta_md5: str | None = None, **kwargs) -> LoadedImage:
    return load_image(item_for(path, meta_md5), **kwargs)


def rejected(path: Path, reason: str, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        load(path, **kwargs)
    message = str(info.value)
    assert str(path) in message, message
    assert reason in message, message
    assert info.value.path == str(path)
    return info.value


def png_bytes(width: int, height: int, color_type: int, bit_depth: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw_rows))
        + chunk(b"IEND", b"")
    )


def pixels(loaded: LoadedImage) -> np.ndarray:
    assert loaded.image.mode == "RGB"
    return np.asarray(loaded.image)


# --------------------------------------------------------------------------- good input


def test_rgb_png_is_kept_exactly_and_hashed_like_ffhq(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(arr).save(path)
    loaded = load(path)
    assert np.array_equal(pixels(loaded), arr)
    assert loaded.original_size == (60, 40)
    with Image.open(path) as img:  # NVlabs' pixel_md5: hashlib.md5(np.array(image))
        assert loaded.pixel_md5 == hashlib.md5(np.array(img)).hexdigest()
    assert loaded.pixel_md5 == hashlib.md5(arr.tobytes()).hexdigest()
    assert loaded.notes == ("pixel-md5 computed",)


def test_long_side_is_reduced_antialiased_and_md5_is_of_the_full_image(tmp_path):
    arr = np.zeros((1000, 2000, 3), dtype=np.uint8)
    arr[:, :1000] = (200, 30, 10)
    arr[:, 1000:] = (10, 40, 220)
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    loaded = load(path, max_side=512)
    assert loaded.image.size == (512, 256)
    assert loaded.original_size == (2000, 1000)
    assert loaded.pixel_md5 == hashlib.md5(arr.tobytes()).hexdigest()
    out = pixels(loaded)
    assert tuple(out[128, 10]) == (200, 30, 10)
    assert tuple(out[128, 500]) == (10, 40, 220)
    assert any(n.startswith("resized 2000x1000 -> 512x256") for n in loaded.notes)


def test_downscale_is_antialiased_bilinear(tmp_path):
    # A one-pixel checkerboard (the highest frequency there is) halved must come out flat grey:
    # point sampling would keep one colour; an antialiased filter averages to the mean.
    arr = np.indices((400, 600)).sum(axis=0) % 2 * 255
    path = tmp_path / "checker.png"
    Image.fromarray(np.repeat(arr[..., None], 3, axis=2).astype(np.uint8)).save(path)
    loaded = load(path, max_side=300)
    out = pixels(loaded).astype(int)
    assert loaded.image.size == (300, 200)
    assert np.abs(out[2:-2, 2:-2] - 127.5).max() <= 1
    with Image.open(path) as img:
        expected = img.convert("RGB").resize((300, 200), Image.Resampling.BILINEAR)
    assert np.array_equal(out, np.asarray(expected))


def test_small_images_are_never_enlarged(tmp_path):
    arr = np.full((30, 20, 3), 77, dtype=np.uint8)
    path = tmp_path / "small.png"
    Image.fromarray(arr).save(path)
    loaded = load(path, max_side=1024)
    assert loaded.image.size == (20, 30)
    assert np.array_equal(pixels(loaded), arr)


def test_large_jpeg_is_drafted_while_decoding(tmp_path):
    arr = np.zeros((1600, 2400, 3), dtype=np.uint8)
    arr[:800] = (250, 250, 250)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=90)
    loaded = load(path, max_side=600)
    assert loaded.image.size == (600, 400)
    assert loaded.original_size == (2400, 1600)
    assert "jpeg-draft 1/4" in loaded.notes
    assert pixels(loaded)[50, 300].min() > 240 and pixels(loaded)[350, 300].max() < 15
    exact = load(path, max_side=600, draft=False)
    assert exact.image.size == (600, 400)
    assert not any(n.startswith("jpeg-draft") for n in exact.notes)
    with Image.open(path) as img:
        assert exact.pixel_md5 == hashlib.md5(img.convert("RGB").tobytes()).hexdigest()
    assert loaded.pixel_md5 != exact.pixel_md5  # documented: a drafted decode hashes the reduced pixels


# --------------------------------------------------------------------------- pixel md5 source


def write_random_png(path: Path, seed: int = 0) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_metadata_md5_is_recorded_without_recomputing(tmp_path):
    path = tmp_path / "00000.png"
    write_random_png(path)
    meta_md5 = "0123456789abcdef0123456789abcdef"  # deliberately not the file's: shows it is not recomputed
    loaded = load(path, meta_md5)
    assert loaded.pixel_md5 == meta_md5
    assert "pixel-md5 from metadata" in loaded.notes


def test_verify_md5_accepts_a_matching_file(tmp_path):
    path = tmp_path / "00000.png"
    arr = write_random_png(path)
    true_md5 = hashlib.md5(arr.tobytes()).hexdigest()
    loaded = load(path, true_md5, verify_md5=True)
    assert loaded.pixel_md5 == true_md5
    assert "pixel-md5 verified against metadata" in loaded.notes


def test_verify_md5_mismatch_names_the_file_and_both_digests(tmp_path):
    path = tmp_path / "00000.png"
    arr = write_random_png(path)
    true_md5 = hashlib.md5(arr.tobytes()).hexdigest()
    meta_md5 = "f" * 32
    error = rejected(path, "pixel md5 mismatch", meta_md5=meta_md5, verify_md5=True)
    assert true_md5 in str(error) and meta_md5 in str(error)


def test_folder_items_always_compute_the_md5(tmp_path):
    path = tmp_path / "photo.png"
    arr = write_random_png(path, seed=3)
    for verify in (False, True):
        loaded = load(path, verify_md5=verify)
        assert loaded.pixel_md5 == hashlib.md5(arr.tobytes()).hexdigest()
        assert "pixel-md5 computed" in loaded.notes


def test_verify_md5_hashes_a_jpeg_at_full_resolution(tmp_path):
    arr = np.zeros((1600, 2400, 3), dtype=np.uint8)
    arr[:800] = (250, 250, 250)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=90)
    with Image.open(path) as img:
        full_md5 = hashlib.md5(img.convert("RGB").tobytes()).hexdigest()
    loaded = load(path, full_md5, max_side=600, verify_md5=True)
    assert loaded.pixel_md5 == full_md5 and loaded.image.size == (600, 400)
    assert not any(n.startswith("jpeg-draft") for n in loaded.notes)


def test_pixel_md5_requires_rgb():
    assert (
        pixel_md5(Image.new("RGB", (2, 1), (1, 2, 3))) == hashlib.md5(bytes([1, 2, 3, 1, 2, 3])).hexdigest()
    )
    with pytest.raises(ValueError, match="RGB"):
        pixel_md5(Image.new("L", (2, 1)))


# --------------------------------------------------------------------------- normalised


def test_exif_rotated_jpeg_is_made_upright(tmp_path):
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)  # stored: red left half, blue right half
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    loaded = load(path)
    assert loaded.image.size == (40, 80)
    assert loaded.original_size == (40, 80)
    assert "exif-transposed (orientation 6)" in loaded.notes
    out = pixels(loaded).astype(int)
    assert out[10, 20, 0] > 200 and out[10, 20, 2] < 50  # left (red) is now on top
    assert out[70, 20, 2] > 200 and out[70, 20, 0] < 50


def test_grayscale_l_becomes_rgb(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "gray.png"
    Image.fromarray(arr, mode="L").save(path)
    loaded = load(path)
    assert np.array_equal(pixels(loaded), np.stack([arr] * 3, axis=-1))
    assert "mode L -> RGB" in loaded.notes


def test_one_bit_becomes_rgb(tmp_path):
    img = Image.new("1", (8, 4), 0)
    img.putpixel((3, 2), 1)
    path = tmp_path / "bits.png"
    img.save(path)
    out = pixels(load(path))
    assert tuple(out[2, 3]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 0)  # transparent
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    loaded = load(path)
    out = pixels(loaded).astype(int)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out[0, 2])
    assert "mode RGBA -> RGB (alpha composited on white)" in loaded.notes


def test_la_is_composited_on_white(tmp_path):
    arr = np.array([[[100, 255], [100, 0]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(arr, mode="LA").save(path)
    out = pixels(load(path))
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == (255, 255, 255)


def test_palette_images_become_rgb(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    plain = tmp_path / "palette.png"
    img.save(plain)
    assert pixels(load(plain)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    transparent = tmp_path / "palette-transparent.png"
    img.save(transparent, transparency=0)
    assert pixels(load(transparent)).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_cmyk_becomes_rgb(tmp_path):
    img = Image.new("CMYK", (4, 4), (255, 0, 0, 0))  # pure cyan
    path = tmp_path / "cmyk.tiff"
    img.save(path)
    loaded = load(path)
    assert tuple(pixels(loaded)[0, 0]) == (0, 255, 255)
    assert "mode CMYK -> RGB" in loaded.notes
    jpeg = tmp_path / "cmyk.jpg"
    img.save(jpeg, quality=95)
    r, g, b = pixels(load(jpeg))[2, 2].astype(int)
    assert r < 20 and g > 235 and b > 235


def test_16_bit_grayscale_is_scaled_to_8_bit(tmp_path):
    arr = np.array([[0, 0x1234, 0xABCD, 0xFFFF]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(arr).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    loaded = load(path)
    assert pixels(loaded)[0, :, 0].tolist() == [0, 0x12, 0xAB, 0xFF]
    assert any(n.endswith("-> RGB (high byte)") for n in loaded.notes)


def test_16_bit_rgb_is_scaled_to_8_bit(tmp_path):
    arr = np.zeros((2, 3, 3), dtype=">u2")
    arr[..., 0], arr[..., 1], arr[..., 2] = 0xABCD, 0x1234, 0xFFFF
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(2))
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(3, 2, color_type=2, bit_depth=16, raw_rows=raw))
    out = pixels(load(path))
    assert out.shape == (2, 3, 3)
    assert tuple(out[1, 2]) == (0xAB, 0x12, 0xFF)


def test_32_bit_integer_grayscale_is_clipped_to_16_bit_then_scaled(tmp_path):
    arr = np.array([[-5, 256, 0x8000, 70000]], dtype=np.int32)
    path = tmp_path / "gray32.tiff"
    Image.fromarray(arr, mode="I").save(path)
    assert pixels(load(path))[0, :, 0].tolist() == [0, 1, 0x80, 0xFF]


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = load(path)
    assert tuple(pixels(loaded)[0, 0]) == (255, 0, 0)
    assert "first of 2 frames" in loaded.notes


# --------------------------------------------------------------------------- rejected


def test_missing_file(tmp_path):
    rejected(tmp_path / "nope.png", "file is missing")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    rejected(path, "empty file (0 bytes)")


def test_directory(tmp_path):
    path = tmp_path / "folder.png"
    path.mkdir()
    rejected(path, "not a regular file")


def test_unreadable_bytes(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image at all" * 10)
    rejected(path, "not a recognised image format")


def test_truncated_png(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rejected(path, "truncated or corrupt")


def test_truncated_jpeg(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    rejected(path, "truncated or corrupt")


def test_corrupt_png_data(tmp_path):
    path = tmp_path / "corrupt.png"
    row = b"\x07" + b"\x01" * 24  # filter type 7 does not exist
    path.write_bytes(png_bytes(8, 8, color_type=2, bit_depth=8, raw_rows=row * 8))
    rejected(path, "truncated or corrupt")


def test_floating_point_image(tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.ones((4, 4), dtype=np.float32), mode="F").save(path)
    rejected(path, "floating-point pixels (mode F)")


def test_over_the_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    error = rejected(path, "200x200 = 40,000 pixels, over the limit of 10,000", max_pixels=10_000)
    assert "decompression-bomb" in error.reason


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    # The header claims 13000 x 12000 (156 MP) but the file is 92 bytes: the size message (and no
    # 156 MB allocation) shows the check runs on the header, before any pixel is decoded.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(13000, 12000, color_type=0, bit_depth=8, raw_rows=b"\x00" * 13001))
    assert 13000 * 12000 > MAX_PIXELS
    rejected(path, f"13000x12000 = 156,000,000 pixels, over the limit of {MAX_PIXELS:,}")


def test_pillows_own_bomb_limit_is_reported_the_same_way(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(30000, 30000, color_type=0, bit_depth=8, raw_rows=b"\x00" * 30001))
    rejected(path, "too large", max_pixels=10**12)


def test_bad_max_side_is_a_caller_error(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match="max_side"):
        load(path, max_side=0)

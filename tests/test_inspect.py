"""``subject-ffhq inspect`` and the overlay it shares with the report gallery."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cli.main import main
from datagen.report.record_figure import (
    PALETTE,
    UNMATCHED_PERSON,
    WARNING_COLOUR,
    caption_runs,
    overlay,
    segment_styles,
)
from tests.run_factory import TEMPLATES, make_run, make_sample


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-run")
    return make_run(root, plan=[["w", "w", "w", "w", "f"]])


def _near(pixels, colour, tol=12):
    return np.all(np.abs(pixels.astype(int) - np.asarray(colour)) <= tol, axis=-1)


def test_inspect_writes_a_png_of_the_sample(run, tmp_path, capsys):
    out = tmp_path / "grace.png"
    assert main(["inspect", str(run["run_dir"]), "3", "--out", str(out)]) == 0  # Grace Hopper, by source id
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape == (950, 1700, 3)
    assert pixels.std() > 20
    # the two matches' colours appear solid (caption spans, label boxes), and the unmatched person's grey
    for colour in (PALETTE[0], PALETTE[1]):
        assert _near(pixels, colour, tol=3).sum() > 200, colour
    assert _near(pixels, UNMATCHED_PERSON, tol=3).sum() > 50


def _warning_pixels(path):
    with Image.open(path) as im:
        top = np.asarray(im.convert("RGB"))[:40]
    red = tuple(int(WARNING_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    return int(_near(top, red, tol=10).sum())


def test_inspect_says_first_when_the_run_used_random_weights(tmp_path, capsys):
    run = make_run(tmp_path, plan=[["w", "w"]])  # the factory's run.json names the tiny profile
    assert main(["inspect", str(run["run_dir"]), "0", "--out", str(tmp_path / "tiny.png")]) == 0
    assert _warning_pixels(tmp_path / "tiny.png") > 300  # the red first line
    run_json = run["run_dir"] / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "profile": "paper"}))
    assert main(["inspect", str(run["run_dir"]), "0", "--out", str(tmp_path / "paper.png")]) == 0
    assert _warning_pixels(tmp_path / "paper.png") == 0


def test_inspect_finds_samples_by_key_and_writes_into_the_run_by_default(run, capsys):
    assert main(["inspect", str(run["run_dir"]), "00001"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(run["run_dir"] / "inspect" / "00001.png")
    assert (run["run_dir"] / "inspect" / "00001.png").stat().st_size > 10_000


def test_inspect_says_why_a_sample_has_no_picture(run, capsys):
    assert main(["inspect", str(run["run_dir"]), "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("subject-ffhq inspect: error: ") and len(err.splitlines()) == 1
    assert "source 4 (key 00004) was not written: failed: image: in-the-wild-images" in err
    assert main(["inspect", str(run["run_dir"]), "999"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("subject-ffhq inspect: error: ") and "no source image with id or key '999'" in err


def test_overlay_colours_matched_and_unmatched_segments():
    # Grace Hopper: "a woman" -> person 1 (match 1), "a wall" -> wall 3 (match 2), person 2 unmatched
    image, seg, record = make_sample(TEMPLATES[2], "00003", "train", np.random.default_rng(0))
    styles = segment_styles(record)
    assert (styles[1].badge, styles[3].badge, styles[2].badge) == ("1", "2", "?")
    assert styles[1].colour == PALETTE[0] and styles[3].colour == PALETTE[1] and styles[2].colour == UNMATCHED_PERSON

    drawn = np.asarray(overlay(image, seg, record, badges=False), dtype=float)
    src = np.asarray(image, dtype=float)
    interior = ndimage_interior(seg)
    for sid, colour in ((1, PALETTE[0]), (2, UNMATCHED_PERSON), (3, PALETTE[1])):
        inside = interior & (seg == sid)
        expect = src[inside] * 0.55 + np.asarray(colour) * 0.45
        assert np.abs(drawn[inside] - expect).max() <= 1.0, sid
    outside = seg == 0
    assert np.array_equal(drawn[outside], src[outside])

    small = overlay(image, seg, record, max_side=64)
    assert max(small.size) == 64


def ndimage_interior(seg):
    edge = ndimage.morphological_gradient(seg.astype(np.int32), size=3) > 0
    return ~ndimage.binary_dilation(edge, iterations=2)


def test_caption_runs_mark_matched_and_unmatched_phrases():
    _, _, record = make_sample(TEMPLATES[3], "00004", "test", np.random.default_rng(0))  # "a man and a man ..."
    runs = caption_runs(record)
    assert "".join(text for text, _, _ in runs) == record.caption
    assert [(t, k, b) for t, k, b in runs if k] == [
        ("a man", "matched", "1"), ("a man", "unmatched", None), ("a rocket launch", "matched", "2")
    ]


def test_inspect_into_a_place_it_cannot_write_says_so_in_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["inspect", str(run["run_dir"]), "3", "--out", str(blocker / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("subject-ffhq inspect: error: ") and len(err.splitlines()) == 1 and "a-file" in err

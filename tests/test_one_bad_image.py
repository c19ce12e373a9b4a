"""One image that one stage cannot process fails alone, in every stage (issue 11, point 1).

The shard's whole path runs in-process, without Ray: ``load_chunk`` -> the stage actor classes
with the tiny models (captioner, segmenter, phrases + matcher) -> ``encode_chunk`` (records) ->
``write_shard_tar``. Each stage in turn is wrapped so that the *real* stage raises on one chosen
image of the chunk; the other five are written, the chosen one fails with a reason naming its
file and the stage.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.shards.plan import plan_shards
from datagen.shards.reader import read_shard
from datagen.sources.images import LoadedImage
from datagen.sources.readers import open_source
from datagen.stage_table import stage
from datagen.stages.failures import StageFailure
from ray_jobs import tasks
from ray_jobs.actors import StageActor
from ray_jobs.chunks import LoadedChunk

pytestmark = pytest.mark.slow

MAX_SIDE = 64
CHOSEN = "c-chosen.png"
CHOSEN_SIZE = (37, 29)  # no other image of the chunk has this size: how the wrappers spot it
GOOD_SIZES = [(48, 32), (40, 40), (56, 30), (33, 50), (60, 45)]


class InjectedStageError(RuntimeError):
    pass


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-bad")
    rng = np.random.default_rng(5)
    names = ["a.png", "b.png", CHOSEN, "d.png", "e.png", "f.png"]
    sizes = [*GOOD_SIZES[:2], CHOSEN_SIZE, *GOOD_SIZES[2:]]
    for name, (w, h) in zip(names, sizes, strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture(scope="module")
def stages(tiny_models_all):
    old = os.environ.get(TINY_MODELS_ENV)
    os.environ[TINY_MODELS_ENV] = str(tiny_models_all)
    try:
        # batches [a b c d e] [f]; the chosen one shares its batch with four good ones
        five = {"batch_size": 5}
        profile = load_profile("tiny", {"captioner": five, "segmenter": five, "matcher": five})
        actors = {name: StageActor(stage(name), profile) for name in ("captioner", "segmenter", "matcher")}
    finally:
        if old is None:
            os.environ.pop(TINY_MODELS_ENV, None)
        else:
            os.environ[TINY_MODELS_ENV] = old
    return actors


def run_shard(source, stages, tmp_path):
    """The job's path for one shard of the source, in-process; returns (manifest samples, tar keys)."""
    (spec,) = plan_shards(open_source(source).items(), shard_size=6)
    (items,) = tasks.split_chunks(spec, images_per_call=6)
    loaded = tasks.load_chunk(0, 0, items, max_side=MAX_SIDE)
    captions = stages["captioner"].run(loaded)
    panoptic = stages["segmenter"].run(loaded)
    matched = stages["matcher"].run(loaded, captions, panoptic)
    rows = tuple(stage(name) for name in ("captioner", "segmenter", "matcher"))
    encoded = tasks.encode_chunk(loaded, rows, {"captioner": "tiny"}, 90, captions, panoptic, matched)
    tar = tmp_path / "subjects-00000.tar"
    written = tasks.write_shard_tar(spec, str(tar), encoded)
    keys = [s.key for s in read_shard(tar)]  # decodes and validates every written sample
    return {s["rel_path"]: s for s in written["samples"]}, keys


class RaiseOnChosen:
    """The real stage object, except that ``method`` raises when the chosen image is in the call."""

    def __init__(self, real, method: str, is_chosen):
        self._real, self._method, self._is_chosen = real, method, is_chosen

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._method:
            return attr

        def call(first, *args, **kwargs):
            if any(self._is_chosen(x) for x in first):
                raise InjectedStageError(f"{self._method} cannot take this one")
            return attr(first, *args, **kwargs)

        return call


def chosen_image(image) -> bool:
    return image.size == CHOSEN_SIZE


class MarkChosenCaption:
    """The real captioner; the chosen image's caption gets a marker the wrapped chunker raises on."""

    def __init__(self, real):
        self._real = real

    def caption(self, images):
        return [f"{c} zzchosen" if chosen_image(im) else c for c, im in zip(self._real.caption(images), images, strict=True)]


def _wrap(monkeypatch, stages, stage: str) -> None:
    if stage == "load":
        import datagen.sources.images as images  # load_chunk loads through images.load_images

        real = images.load_image

        def load_image(item, **kwargs):
            if item.rel_path == CHOSEN:
                raise InjectedStageError("decoder cannot take this one")
            return real(item, **kwargs)

        monkeypatch.setattr(images, "load_image", load_image)
    elif stage == "captioner":
        monkeypatch.setattr(stages["captioner"].step, "captioner", RaiseOnChosen(stages["captioner"].step.captioner, "caption", chosen_image))
    elif stage == "segmenter":
        monkeypatch.setattr(stages["segmenter"].step, "segmenter", RaiseOnChosen(stages["segmenter"].step.segmenter, "segment", chosen_image))
    elif stage == "phrases":
        monkeypatch.setattr(stages["captioner"].step, "captioner", MarkChosenCaption(stages["captioner"].step.captioner))
        chunker = RaiseOnChosen(stages["matcher"].step.chunker, "chunk", lambda caption: caption.endswith("zzchosen"))
        monkeypatch.setattr(stages["matcher"].step, "chunker", chunker)
    elif stage == "matcher":
        monkeypatch.setattr(stages["matcher"].step, "matcher", RaiseOnChosen(stages["matcher"].step.matcher, "match", chosen_image))
    elif stage == "record":
        import datagen.record.build as record_build

        real = record_build.build_record

        def build_record(loaded, *args, **kwargs):
            if loaded.item.rel_path == CHOSEN:
                raise InjectedStageError("record cannot take this one")
            return real(loaded, *args, **kwargs)

        monkeypatch.setattr(record_build, "build_record", build_record)
    elif stage == "encode":
        real = tasks.encode_segment_map

        def encode_segment_map(segment_map):
            if segment_map.shape == CHOSEN_SIZE[::-1]:
                raise InjectedStageError("PNG encoder cannot take this one")
            return real(segment_map)

        monkeypatch.setattr(tasks, "encode_segment_map", encode_segment_map)


@pytest.mark.parametrize(
    ("stage", "named"),
    [("load", "load"), ("captioner", "captioner"), ("segmenter", "segmenter"), ("phrases", "phrases"),
     ("matcher", "matcher"), ("record", "record"), ("encode", "record")],
)
def test_a_stage_raising_on_one_image_fails_that_image_alone(stage, named, source, stages, tmp_path, monkeypatch):
    _wrap(monkeypatch, stages, stage)
    samples, keys = run_shard(source, stages, tmp_path)
    chosen = samples.pop(CHOSEN)
    assert chosen["status"] == "failed"
    assert chosen["reason"].startswith(f"{named}: {CHOSEN}: InjectedStageError: ")
    assert all(s["status"] == "written" and s["reason"] is None for s in samples.values())
    assert keys == sorted(s["key"] for s in samples.values()) and len(keys) == 5


def test_a_clean_chunk_writes_all_six(source, stages, tmp_path):
    samples, keys = run_shard(source, stages, tmp_path)
    assert len(keys) == 6 and {s["status"] for s in samples.values()} == {"written"}


def test_a_1x4000_photo_fails_at_load_and_alone(source, stages, tmp_path_factory):
    root = tmp_path_factory.mktemp("thin")
    for p in source.iterdir():
        if p.name != CHOSEN:
            (root / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (1, 4000), (200, 10, 10)).save(root / "thin.png")
    samples, keys = run_shard(root, stages, tmp_path_factory.mktemp("thin-out"))
    thin = samples.pop("thin.png")
    assert thin["status"] == "failed"
    assert thin["reason"] == (
        "load: thin.png: image is 1x64 px as stored, under the minimum side of 16 px (too thin or too small for "
        "the models) (original 1x4000)"
    )
    assert len(keys) == 5 and {s["status"] for s in samples.values()} == {"written"}


def test_the_segmenter_refusing_a_thin_image_fails_it_alone_even_alone_in_its_batch(source, stages):
    """The issue's crash, past the load check: Mask2Former's processor raises on a 1-px-wide image."""
    items = open_source(source).items()
    loaded = tasks.load_chunk(0, 0, items[:5], max_side=MAX_SIDE)
    thin = LoadedImage(item=items[5], image=Image.new("RGB", (1, 1024), (9, 9, 9)), pixel_md5="0" * 32,
                       original_size=(1, 4000))
    chunk = LoadedChunk(0, 0, [*loaded.loaded, thin])  # batches of 5: the thin one is alone in the second
    results = stages["segmenter"].run(chunk)
    assert not any(isinstance(r, StageFailure) for r in results[:5])
    assert isinstance(results[5], StageFailure)
    assert results[5].reason.startswith(f"segmenter: {items[5].rel_path}: ValueError: ")
    assert "width" in results[5].reason


"""Placement and pacing of the dataset job (``ray:``/``shards:`` sections), the testing hook's
parsing, and the stage actors' failure isolation: pure logic, no Ray cluster needed."""

from __future__ import annotations

import pytest
from PIL import Image

from datagen.config import load_profile
from datagen.stages.failures import StageFailure, in_batches, isolate_failures
from fixtures.failure_hooks import InjectedFailure, ShardFaults, trigger
from ray_jobs.settings import (
    GPU_SHARES,
    SettingsError,
    config_digest,
    resolve_settings,
    with_defaults,
)


@pytest.fixture
def paper():
    return load_profile("paper")


def test_cpu_only_two_cores_fits_actors_and_leaves_room_for_tasks(paper):
    s = resolve_settings(paper, {"CPU": 2.0})
    assert {n: (p.replicas, p.num_gpus) for n, p in s.stages.items()} == {
        "captioner": (1, 0.0), "segmenter": (1, 0.0), "matcher": (1, 0.0)
    }
    actor_cpus = sum(p.num_cpus * p.replicas for p in s.stages.values())
    assert actor_cpus == pytest.approx(1.5)
    # at least one task can always run next to the actors
    assert 0 < s.task_num_cpus <= 2.0 - actor_cpus
    assert s.max_shards_in_flight == 6 and s.max_chunks_in_flight == 9


def test_gpus_one_replica_set_per_gpu_sharing_it(paper):
    s = resolve_settings(paper, {"CPU": 32.0, "GPU": 4.0})
    for name, p in s.stages.items():
        assert p.replicas == 4
        assert p.num_gpus == GPU_SHARES[name]
        assert p.num_cpus == 1.0
    # one replica of every stage fills exactly one GPU
    assert sum(GPU_SHARES.values()) == pytest.approx(1.0)
    assert s.task_num_cpus == 1.0
    assert s.total_actors == 12 and s.max_shards_in_flight == 24


def test_explicit_values_override_auto(paper):
    over = {"ray": {"stages": {"captioner": {"replicas": 3, "num_gpus": 1, "num_cpus": 2}}, "max_shards_in_flight": 5},
            "shards": {"size": 7}}
    s = resolve_settings(load_profile("paper", over), {"CPU": 16.0, "GPU": 2.0})
    cap = s.stages["captioner"]
    assert (cap.replicas, cap.num_gpus, cap.num_cpus) == (3, 1.0, 2.0)
    assert s.stages["segmenter"].replicas == 2  # still auto
    assert s.max_shards_in_flight == 5 and s.shard_size == 7


@pytest.mark.parametrize(
    "over, key",
    [
        ({"ray": {"stages": {"captioner": {"replicas": 0}}}}, "ray.stages.captioner.replicas"),
        ({"ray": {"stages": {"captioner": {"num_gpus": "half"}}}}, "ray.stages.captioner.num_gpus"),
        ({"ray": {"stages": {"tagger": {}}}}, "tagger"),
        ({"shards": {"size": 0}}, "shards.size"),
        ({"shards": {"jpeg_quality": 101}}, "shards.jpeg_quality"),
        ({"shards": {"verify_pixel_md5": "yes"}}, "shards.verify_pixel_md5"),
        ({"ray": {"scheduling_strategy": "PACKED"}}, "ray.scheduling_strategy"),
    ],
)
def test_bad_settings_name_the_key(paper, over, key):
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        resolve_settings(load_profile("paper", over), {"CPU": 4.0})


def test_config_digest_follows_content_not_placement(paper):
    base = config_digest(paper)
    placed = load_profile("paper", {"ray": {"stages": {"captioner": {"replicas": 9}}, "images_per_call": 3}})
    assert config_digest(placed) == base
    assert config_digest(load_profile("paper", {"shards": {"max_side": 512}})) != base
    assert config_digest(load_profile("paper", {"captioner": {"max_new_tokens": 5}})) != base
    assert with_defaults(paper)["shards"]["size"] == 1000


def test_verify_pixel_md5_defaults_off_and_is_not_in_the_digest(paper):
    assert resolve_settings(paper, {"CPU": 4.0}).verify_pixel_md5 is False
    verifying = load_profile("paper", {"shards": {"verify_pixel_md5": True}})
    assert resolve_settings(verifying, {"CPU": 4.0}).verify_pixel_md5 is True
    # it checks the source, never changes a shard's bytes: a resume may switch it freely
    assert config_digest(verifying) == config_digest(paper)


def test_load_chunk_passes_verify_pixel_md5_to_load_image(tmp_path):
    from datagen.sources.readers import SourceItem
    from ray_jobs.tasks import load_chunk

    path = tmp_path / "00000.png"
    Image.new("RGB", (24, 18), (10, 20, 30)).save(path)
    wrong = "e" * 32
    item = SourceItem("0", "00000", str(path), path.name, wrong, "train", None, {"pixel_md5": wrong})
    trusted = load_chunk(0, 0, [item], max_side=64)
    assert [li.pixel_md5 for li in trusted.loaded] == [wrong] and trusted.failed == {}
    verified = load_chunk(0, 0, [item], max_side=64, verify_pixel_md5=True)
    assert verified.loaded == []
    assert verified.failed["0"].startswith("load: 00000.png: pixel md5 mismatch")


def test_fault_drill_hooks():
    drill = ShardFaults(fail_shards={0: "kill"}, stop_after_shards=2)
    assert drill.describe() == "FAULT DRILL: failing shards 0:kill; stopping after 2 shard(s)"
    assert [drill.stop_after(n) for n in (0, 1, 2, 3)] == [False, False, True, True]
    assert ShardFaults().describe() == "" and not ShardFaults().stop_after(100)
    assert ShardFaults().wrap_write_task(len) is len  # no faults: the task is not wrapped
    with pytest.raises(ValueError, match="fail modes"):
        ShardFaults(fail_shards={1: "explode"})
    with pytest.raises(InjectedFailure, match="subjects-00005"):
        trigger("raise", "subjects-00005")


def _square_roots(xs: list) -> list:
    if any(x < 0 for x in xs):
        raise ValueError(f"negative input in {xs}")
    return [x**0.5 for x in xs]


def test_isolate_failures_fails_only_the_bad_input():
    out = isolate_failures("stage", _square_roots, [4, -1, 9], ["a.png", "b.png", "c.png"])
    assert out[0] == 2.0 and out[2] == 3.0
    assert isinstance(out[1], StageFailure)
    assert out[1].reason.startswith("stage: b.png: ValueError: negative input in [-1]")


def test_isolate_failures_when_every_input_fails_the_probe_decides():
    from datagen.stages.failures import StageBroken

    # the images are at fault (the probe passes): each fails alone, a batch of one included
    out = isolate_failures("stage", _square_roots, [-1, -4], ["a.png", "b.png"], probe=lambda: 1)
    assert [o.reason for o in out] == [
        "stage: a.png: ValueError: negative input in [-1]", "stage: b.png: ValueError: negative input in [-4]"
    ]
    (alone,) = isolate_failures("stage", _square_roots, [-9], ["c.png"], probe=lambda: 1)
    assert alone.reason == "stage: c.png: ValueError: negative input in [-9]"
    # the stage is at fault (the probe fails too): the batch error is raised, to fail the shard
    with pytest.raises(StageBroken, match=r"every image of a batch failed \(a, b\).*negative input in \[-1, -4\]"):
        isolate_failures("stage", _square_roots, [-1, -4], ["a", "b"], probe=lambda: -1)
    with pytest.raises(StageBroken, match=r"\(a\)"):
        isolate_failures("stage", _square_roots, [-1], ["a"], probe=lambda: -1)


def test_size_problem_refuses_thin_images():
    from datagen.stages.failures import MIN_SIDE, size_problem

    assert size_problem((MIN_SIDE, 1024)) is None and size_problem((40, 30)) is None
    assert "1x1024 px as stored, under the minimum side of 16 px" in size_problem((1, 1024))
    assert size_problem((1024, MIN_SIDE - 1)) is not None


def test_in_batches_keeps_order_across_batches():
    out = in_batches("stage", _square_roots, [1, 4, 9, -1, 16], list("abcde"), batch_size=2)
    assert out[:3] == [1.0, 2.0, 3.0] and out[4] == 4.0
    assert isinstance(out[3], StageFailure) and "d" in out[3].reason
    # the arrangement: the bad image alone in the last batch fails alone, not the chunk
    out = in_batches("stage", _square_roots, [1, 4, 9, 16, -1], list("abcde"), batch_size=4, probe=lambda: 1)
    assert out[:4] == [1.0, 2.0, 3.0, 4.0] and out[4].reason == "stage: e: ValueError: negative input in [-1]"


def test_root_cause_finds_the_stage_exception_in_a_ray_traceback():
    from ray_jobs.pool import root_cause

    wrapped = RuntimeError(
        "The actor died because of an error raised in its creation task, ray::CaptionerActor.__init__() (pid=1)\n"
        '  File "/x/captioner.py", line 3, in from_profile\n'
        "    raise ModelNotFoundError(\n"
        "datagen.stages.model_loading.ModelNotFoundError: captioner (BLIP-2): model '/m/blip2' not found\n"
        "How to get it: build the tiny models."
    )
    assert root_cause(wrapped) == (
        "ModelNotFoundError: captioner (BLIP-2): model '/m/blip2' not found How to get it: build the tiny models."
    )
    assert root_cause(RuntimeError("The worker died unexpectedly.\nCheck the logs.")) == (
        "RuntimeError: The worker died unexpectedly. Check the logs."
    )

"""Placement and pacing of the dataset job (``ray:``/``shards:`` sections), the testing hook's
parsing, and the stage actors' failure isolation: pure logic, no Ray cluster needed."""

from __future__ import annotations

import pytest
from PIL import Image

from datagen.config import ProfileError, load_profile
from datagen.stages.failures import StageFailure, in_batches, isolate_failures
from fixtures.failure_hooks import InjectedFailure, ShardFaults, trigger
from ray_jobs.settings import GPU_SHARES, SettingsError, config_digest, resolve_settings


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
    "over, message",
    [
        ({"ray": {"stages": {"captioner": {"replicas": 0}}}}, "ray.stages.captioner.replicas must be >= 1, got 0"),
        ({"ray": {"stages": {"captioner": {"num_gpus": "half"}}}},
         "ray.stages.captioner.num_gpus must be 'auto' or a number, got 'half'"),
        ({"ray": {"stages": {"tagger": {}}}}, "unknown setting 'ray.stages.tagger'"),
        ({"shards": {"size": 0}}, "shards.size must be >= 1, got 0"),
        ({"shards": {"jpeg_quality": 101}}, "shards.jpeg_quality must be in 1..100, got 101"),
        ({"shards": {"verify_pixel_md5": "yes"}}, "shards.verify_pixel_md5 must be true or false, got 'yes'"),
        ({"ray": {"scheduling_strategy": "PACKED"}}, "ray.scheduling_strategy must be one of 'DEFAULT', 'SPREAD', got 'PACKED'"),
    ],
)
def test_bad_settings_name_the_key_before_any_cluster_is_asked(over, message):
    with pytest.raises(ProfileError) as err:
        load_profile("paper", over)
    assert message in str(err.value)


def test_a_cluster_without_cpus_is_refused(paper):
    with pytest.raises(SettingsError, match="no CPUs"):
        resolve_settings(paper, {"GPU": 1.0})


def test_config_digest_follows_content_not_placement(paper):
    base = config_digest(paper)
    placed = load_profile("paper", {"ray": {"stages": {"captioner": {"replicas": 9}}, "images_per_call": 3}})
    assert config_digest(placed) == base
    assert config_digest(load_profile("paper", {"captioner": {"device": "cuda:1"}})) == base  # where, not what
    assert config_digest(load_profile("paper", {"shards": {"max_side": 512}})) != base
    assert config_digest(load_profile("paper", {"captioner": {"max_new_tokens": 5}})) != base
    assert config_digest(load_profile("paper", {"phrases": {"max_expand": 3}})) != base


def test_config_digest_is_the_one_runs_recorded_before_settings_were_typed(paper):
    """Finished shards of a run started before the typed config layer are still recognised on
    resume: these are the digests the earlier dict-based code computed for the same settings."""
    assert config_digest(paper) == "a3fd134fadc417d02a684a72b72ee784d8ad954fd423d1e0263ac5e73297d37c"
    changed = load_profile("paper", {"captioner": {"max_new_tokens": 5}, "shards": {"verify_pixel_md5": True}})
    assert config_digest(changed) == "ac0d04121b23a0d20c7f0f9429fa159d7ff639d45a7fb10d1c2b668bd3dcda77"


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
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)
    wrong = "e" * 32
    item = SourceItem("0", "00000", str(path), path.name, wrong, "train", None, {"pixel_md5": wrong})
    trusted = load_chunk(0, 0, [item], max_side=64)
    assert [li.pixel_md5 for li in trusted.loaded] == [wrong] and trusted.failed == {}
    verified = load_chunk(0, 0, [item], max_side=64, verify_pixel_md5=True)
    assert verified.loaded == []
    assert "pixel md5 mismatch" in verified.failed["0"] and str(path) in verified.failed["0"]


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


def test_isolate_failures_reraises_when_every_input_fails():
    with pytest.raises(ValueError, match=r"\[-1, -4\]"):
        isolate_failures("stage", _square_roots, [-1, -4], ["a", "b"])
    with pytest.raises(ValueError):
        isolate_failures("stage", _square_roots, [-1], ["a"])


def test_in_batches_keeps_order_across_batches():
    out = in_batches("stage", _square_roots, [1, 4, 9, -1, 16], list("abcde"), batch_size=2)
    assert out[:3] == [1.0, 2.0, 3.0] and out[4] == 4.0
    assert isinstance(out[3], StageFailure) and "d" in out[3].reason


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

"""Placement and pacing of the dataset job (``ray:``/``shards:`` sections), the testing hook's
parsing, and the stage actors' failure isolation: pure logic, no Ray cluster needed."""

from __future__ import annotations

import pytest
from PIL import Image

from datagen.config import ProfileError, load_profile
from datagen.stage_table import STAGES
from datagen.stages.failures import StageFailure, in_batches, isolate_failures
from fixtures.failure_hooks import InjectedFailure, ShardFaults, trigger
from ray_jobs.settings import SettingsError, config_digest, resolve_settings

GPU_SHARES = {st.name: st.gpu_share for st in STAGES}


@pytest.fixture
def paper():
    return load_profile("paper")


def test_cpu_only_two_cores_fits_actors_and_leaves_room_for_tasks(paper):
    s = resolve_settings(paper, {"CPU": 2.0})
    assert {n: (p.replicas, p.num_gpus) for n, p in s.stages.items()} == {
        "captioner": (1, 0.0), "segmenter": (1, 0.0), "matcher": (1, 0.0), "faces": (1, 0.0), "identity": (1, 0.0)
    }
    actor_cpus = sum(p.num_cpus * p.replicas for p in s.stages.values())
    assert actor_cpus == pytest.approx(1.5)  # 5 actors x 0.3 (3/4 of the CPUs, in steps of 0.05)
    # at least one task can always run next to the actors
    assert 0 < s.task_num_cpus <= 2.0 - actor_cpus
    assert s.max_shards_in_flight == 10 and s.max_chunks_in_flight == 15


def test_gpus_one_replica_set_per_gpu_sharing_it(paper):
    s = resolve_settings(paper, {"CPU": 32.0, "GPU": 4.0})
    # panoptic rows; sam3 (grounding: sam3) stands in for segmenter + matcher
    assert GPU_SHARES == {"captioner": 0.5, "segmenter": 0.2, "matcher": 0.2, "sam3": 0.4, "faces": 0.05, "identity": 0.05}
    for name, p in s.stages.items():
        assert p.replicas == 4
        assert p.num_gpus == GPU_SHARES[name]
        assert p.num_cpus == 1.0
    # one replica of every stage a build runs fills exactly one GPU
    assert sum(p.num_gpus for p in s.stages.values()) == pytest.approx(1.0)
    assert s.task_num_cpus == 1.0
    assert s.total_actors == 20 and s.max_shards_in_flight == 40


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


def test_config_digest_is_pinned_and_runs_without_face_checks_are_redone(paper):
    """The digest is pinned, so that it only ever changes on purpose. It changed on purpose twice: the
    face stage (``faces:``, record schema 1.1) joined the content sections, so shards of runs made
    before it (digests a3fd134f… and ac0d0412… for the settings below, records without face checks)
    are redone on resume rather than mixed with face-checked ones; then the identity stage
    (``identity:``, schema 1.2 ``identity_faces``; digests 6b2109cd…, 42f056a0…, 2326224c… before it)."""
    unpadded = load_profile("paper", {"segmenter": {"pad_to": "none"}})  # the segmenter those runs had
    assert config_digest(unpadded) == "d154034816bb0e7f7128d006c32a4f278e98c309c058754ffec92cf53c3f09ef"
    changed = load_profile("paper", {"captioner": {"max_new_tokens": 5}, "shards": {"verify_pixel_md5": True},
                                     "segmenter": {"pad_to": "none"}})
    assert config_digest(changed) == "e442ea3addb7363ecfebe66c1926ff9aad681a456103fbd72676e7d3817ff1fc"
    assert config_digest(paper) == "ff39e7ccf0b23196f88411a0128475db57a8457ddc2b7c485fc921e77e76292a"
    # the square canvas segments differently, so its shards must never be mixed with those
    assert config_digest(paper) != config_digest(unpadded)
    # a face setting changes the records (flags, faces kept), so it changes the digest; the device does not
    assert config_digest(load_profile("paper", {"faces": {"small_face_px": 48}})) != config_digest(paper)
    assert config_digest(load_profile("paper", {"faces": {"device": "cuda:1"}})) == config_digest(paper)


def test_verify_pixel_md5_defaults_off_and_is_not_in_the_digest(paper):
    assert resolve_settings(paper, {"CPU": 4.0}).verify_pixel_md5 is False
    verifying = load_profile("paper", {"shards": {"verify_pixel_md5": True}})
    assert resolve_settings(verifying, {"CPU": 4.0}).verify_pixel_md5 is True
    # it checks the source, never changes a shard's bytes: a resume may switch it freely
    assert config_digest(verifying) == config_digest(paper)


def test_load_chunk_passes_verify_pixel_md5_to_load_image(tmp_path):
    from datagen.sources.items import SourceItem
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


# ---- `build` refuses bad settings before Ray starts: exit 2, one line, nothing written -------
@pytest.fixture(scope="module")
def stage_models(tiny_model, tiny_models_root):
    """The folder ``{tiny}`` stands for, holding the four models ``build`` checks."""
    for name in ("blip2", "mask2former", "open_clip", "sbert"):
        tiny_model(name)
    return tiny_models_root


def run_build_cli(tmp_path, capsys, *extra: str, out=None, manifests=None) -> tuple[int, str]:
    from cli.main import main

    out = out or tmp_path / "out"
    manifests = manifests or tmp_path / "manifests"
    code = main(["build", "--source", str(tmp_path / "source"), "--out", str(out), "--profile", "tiny",
                 "--manifests", str(manifests), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return code, err


def nothing_written(tmp_path) -> bool:
    return not (tmp_path / "out").exists() and not (tmp_path / "manifests").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ("captoner: {batch_size: 2}\n", "unknown setting 'captoner' in {config}; did you mean 'captioner'?"),
        ("captioner: {batch_size: four}\n", "captioner.batch_size must be an integer, got 'four'"),
        ("ray: {stages: {matcher: {num_gpus: -1}}}\n", "ray.stages.matcher.num_gpus must be >= 0, got -1"),
    ],
)
def test_cli_refuses_a_bad_config(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    code, err = run_build_cli(tmp_path, capsys, "--config", str(path))
    assert code == 2 and message.format(config=path) in err
    assert nothing_written(tmp_path)


def test_cli_later_config_overlays_win_and_are_each_checked(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("shards: {size: 3}\n")
    bad.write_text("shards: {sise: 3}\n")
    code, err = run_build_cli(tmp_path, capsys, "--config", str(good), "--config", str(bad))
    assert code == 2 and f"unknown setting 'shards.sise' in {bad}; did you mean 'shards.size'?" in err


@pytest.mark.parametrize(
    "layout, option, message",
    [
        ("out-file", "--out", "is a file, not a folder"),
        ("out-shards-file", "--out", "shards is a file, not a folder"),
        ("out-under-file", "--out", "is a file, not a folder"),
        ("manifests-file", "--manifests", "is a file, not a folder"),
        ("run-dir-file", "--manifests", "is a file, not a folder"),
    ],
)
def test_cli_refuses_output_folders_that_are_files(tmp_path, capsys, layout, option, message):
    out, manifests = tmp_path / "out", tmp_path / "manifests"
    if layout == "out-file":
        out.write_text("x")
    elif layout == "out-shards-file":
        out.mkdir()
        (out / "shards").write_text("x")
    elif layout == "out-under-file":
        (tmp_path / "blocker").write_text("x")
        out = tmp_path / "blocker" / "out"
    elif layout == "manifests-file":
        manifests.write_text("x")
    else:
        (manifests / "out").parent.mkdir()
        (manifests / "out").write_text("x")  # the run folder (named after --out) is a file
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = run_build_cli(tmp_path, capsys, out=out, manifests=manifests)
    assert code == 2 and f"error: {option}: " in err and message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/abs"])
def test_cli_refuses_a_run_name_that_is_not_one_folder_name(tmp_path, capsys, name):
    code, err = run_build_cli(tmp_path, capsys, "--run-name", name)
    assert code == 2 and f"--run-name {name!r} must be one plain folder name" in err
    assert nothing_written(tmp_path)


def test_cli_missing_model_fails_at_once_naming_it(tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUBJECT_FFHQ_TINY_MODELS", str(tmp_path / "no-models-here"))
    t = time.monotonic()
    code, err = run_build_cli(tmp_path, capsys)
    assert time.monotonic() - t < 30  # was ~90 s when only the actors found out; ~1 s when quiet
    assert code == 2 and "captioner (BLIP-2): model" in err and str(tmp_path / "no-models-here" / "blip2") in err
    assert nothing_written(tmp_path)


def test_cli_missing_matcher_model_is_named_too(tmp_path, capsys, monkeypatch, stage_models):
    monkeypatch.setenv("SUBJECT_FFHQ_TINY_MODELS", str(stage_models))
    config = tmp_path / "c.yaml"
    config.write_text(f"matcher: {{sbert_model: {tmp_path / 'gone' / 'sbert'}}}\n")
    code, err = run_build_cli(tmp_path, capsys, "--config", str(config))
    assert code == 2 and "sentence-transformers" in err.lower() and str(tmp_path / "gone" / "sbert") in err
    assert nothing_written(tmp_path)


def test_wait_for_address_gives_up_in_the_time_given():
    import time

    from ray_jobs.cluster import RayConnectError, wait_for_address

    t = time.monotonic()
    with pytest.raises(RayConnectError, match=r"no Ray cluster answered at 127\.0\.0\.1:1 within 1 s"):
        wait_for_address("127.0.0.1:1", timeout_s=1.0)
    assert 1.0 <= time.monotonic() - t < 4.0
    wait_for_address("auto", timeout_s=0.01)  # no port: left to Ray


def test_wait_for_address_returns_once_something_listens():
    import socket
    import time

    from ray_jobs.cluster import wait_for_address

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        t = time.monotonic()
        wait_for_address(f"127.0.0.1:{port}", timeout_s=5)
        wait_for_address(f"ray://127.0.0.1:{port}", timeout_s=5)  # a Ray Client address: same host and port
        assert time.monotonic() - t < 2


def test_cli_ray_address_with_nothing_there_gives_up_naming_it(tmp_path, stage_models):
    import os
    import subprocess
    import sys
    from pathlib import Path

    # A process of its own: in this one another test may have started Ray, which build would use
    # instead of looking at the address.
    config = tmp_path / "c.yaml"
    config.write_text("ray: {connect_timeout_s: 3}\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "SUBJECT_FFHQ_TINY_MODELS": str(stage_models)}
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "build", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "out"),
         "--profile", "tiny", "--manifests", str(tmp_path / "manifests"), "--config", str(config)],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("subject-ffhq build: error: no Ray cluster answered at 127.0.0.1:1 within 3 s (")
    assert "check --ray-address / $RAY_ADDRESS" in line
    assert nothing_written(tmp_path)


def test_cli_ctrl_c_while_joining_stops_at_once(tmp_path, stage_models):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "SUBJECT_FFHQ_TINY_MODELS": str(stage_models)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "build", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "out"),
         "--profile", "tiny", "--manifests", str(tmp_path / "manifests")],
        cwd=Path(__file__).parent.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run started in the background inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()  # printed just before it starts waiting for the address (60 s by default)
        assert "joining Ray at 127.0.0.1:1 (giving up after 60 s)" in line
        time.sleep(0.5)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.readline()
        assert time.monotonic() - t < 5  # stopped waiting at once (the interpreter's own exit follows)
        assert proc.wait(timeout=60) == 130
        err += proc.stderr.read()
    finally:
        proc.kill()
    assert err.strip() == "subject-ffhq build: interrupted while starting; re-run the same command to resume"
    assert nothing_written(tmp_path)


def test_a_file_url_out_is_checked_where_the_job_writes_it(tmp_path, capsys):
    (tmp_path / "blocker").write_text("x")
    code, err = run_build_cli(tmp_path, capsys, out=f"file://{tmp_path}/blocker/out")
    assert code == 2 and "error: --out: " in err and f"{tmp_path}/blocker is a file, not a folder" in err

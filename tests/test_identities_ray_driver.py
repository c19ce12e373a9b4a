"""The driver side of ``identities --ray-address`` without a cluster: which paths it makes absolute
before they travel to a node, and a Ray error that is not the task's own raised as one line."""

from __future__ import annotations

import os

import pytest

from ray_jobs.identities import NodeError, absolute, run_argument, wait_for


def test_a_run_name_travels_as_a_name_and_a_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_argument("demo") == "demo"  # looked up under --manifests-root on the node
    assert run_argument("runs/demo") == os.path.join(str(tmp_path), "runs", "demo")
    (tmp_path / "here").mkdir()
    assert run_argument("here") == str(tmp_path / "here")  # exists locally: a path
    assert run_argument("s3://bucket/run") == "s3://bucket/run"
    assert absolute("shards") == str(tmp_path / "shards")
    assert absolute("s3://bucket/shards") == "s3://bucket/shards" and absolute(None) is None


def test_a_ray_error_that_is_not_the_tasks_own_is_one_line_naming_it(monkeypatch):
    import ray

    def get(ref):
        raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\n"
                                              "Memory on the node was 7.5GB / 8GB\nmore detail")

    monkeypatch.setattr(ray, "wait", lambda refs, timeout=None: (refs, []))
    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(NodeError) as e:
        wait_for(object())
    assert str(e.value) == ("the identities task failed on the cluster: OutOfMemoryError: "
                            "Task was killed due to the node running low on memory.")

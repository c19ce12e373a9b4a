"""The dataset job on a simulated 2-node Ray cluster: losing a worker node mid-run loses nothing
and duplicates nothing."""

from __future__ import annotations

import json

import pytest

from datagen.config import TINY_MODELS_ENV, load_profile
from datagen.stage_table import stage_names
from ray_jobs.job import BuildRequest, run_build
from tests.test_ray_job_end_to_end import check_run, entries

pytestmark = [pytest.mark.slow, pytest.mark.scale]

# Logical CPUs small enough that everything still fits on the head alone once the worker is
# gone; SPREAD puts actors and tasks on both nodes while both are up.
CLUSTER_CONFIG = {
    "shards": {"size": 3, "max_side": 256},
    "ray": {
        "images_per_call": 2,
        "scheduling_strategy": "SPREAD",
        "stages": {name: {"num_cpus": 0.25} for name in stage_names()},  # every stage of the table
        "task_num_cpus": 0.25,
        "max_shards_in_flight": 2,  # shards 2 and 3 are still to come when the node goes
        "shard_attempts": 3,
        "progress_interval_s": 10,
    },
}


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's shared Ray (tests/conftest.py); this test runs last
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.own_ray_cluster
def test_losing_a_worker_node_mid_run_loses_nothing(two_node_cluster, tiny_models_all, sample_source, tmp_path, monkeypatch):
    cluster, worker = two_node_cluster
    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_all))
    profile = load_profile("tiny", CLUSTER_CONFIG)
    seen: dict = {}

    def remove_worker_after_first_shard(entry, job):
        if seen:
            return
        seen["first"] = entry["shard"]
        seen["actor_nodes"] = {i["node_id"] for infos in job.actor_info.values() for i in infos}
        cluster.remove_node(worker, allow_graceful=False)

    request = BuildRequest(source=sample_source, out=tmp_path / "out", profile=profile, run_name="cluster",
                           manifests_root=tmp_path / "manifests")
    summary = run_build(request, on_shard_done=remove_worker_after_first_shard)

    assert worker.node_id in seen["actor_nodes"], "no actor ran on the worker node: its loss proved nothing"
    assert summary.status == "complete" and summary.shards_failed == 0
    assert sorted(entries(summary.run_dir)) == [0, 1, 2, 3]
    statuses = check_run(summary.run_dir, sample_source)
    assert sum(s["status"] == "written" for s in statuses.values()) == 11
    assert [sid for sid, s in statuses.items() if s["status"] == "duplicate"] == ["1003"]
    run = json.loads((summary.run_dir / "run.json").read_text())
    assert run["counts"]["pending"] == 0 and run["counts"]["failed"] == 0

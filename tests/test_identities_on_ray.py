"""``subject-ffhq identities RUN --ray-address ADDR`` on a simulated cluster (a head with no CPUs, a
worker too small for the step, then a worker that holds the data): the step runs as one task on the
node that can hold it and writes what a local run writes; a cluster that cannot hold it, a label no
node has, and a run folder the node cannot see fail in seconds with the reason."""

from __future__ import annotations

import shutil
import time

import pyarrow.parquet as pq
import pytest

from cli.main import main

pytestmark = [pytest.mark.own_ray_cluster]

OUTPUTS = ("identities.parquet", "split.parquet", "pairs.parquet", "references/crops.parquet",
           "references/targets.parquet")


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's shared Ray (tests/conftest.py); these tests run last
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    small = cluster.add_node(num_cpus=2, memory=64 * 2**20)  # under the step's base request (256 MiB)
    cluster.wait_for_nodes()
    try:
        yield cluster, small
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def data_node(cluster):
    """A worker that can hold the step and carries the data's resource and label."""
    c, _ = cluster
    node = c.add_node(num_cpus=2, memory=2 * 2**30, resources={"data": 1}, labels={"zone": "data"})
    c.wait_for_nodes()
    return node


@pytest.fixture
def run_copy(identity_run, tmp_path):
    """The identity run's folder without what the identities step writes."""
    run = shutil.copytree(identity_run["run"], tmp_path / "run")
    for name in ("identities.parquet", "split.parquet", "pairs.parquet", "identities.json"):
        (run / name).unlink()
    shutil.rmtree(run / "references")
    return run


def identities(*args: str) -> tuple[int, float]:
    t = time.perf_counter()
    code = main(["identities", *args])
    return code, time.perf_counter() - t


def test_a_cluster_with_no_node_big_enough_fails_in_seconds_naming_the_request(cluster, run_copy, capsys):
    c, small = cluster
    code, seconds = identities(str(run_copy), "--ray-address", c.address)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "no node of the Ray cluster can run the identities step" in err
    assert "GB memory" in err and small.node_id[:12] in err  # what was asked, and what each node has
    assert seconds < 120, "an infeasible request must be refused, not left pending"
    assert not (run_copy / "identities.parquet").exists()


def test_the_step_runs_on_the_data_node_and_writes_what_a_local_run_writes(cluster, data_node, identity_run,
                                                                          run_copy, capsys):
    c, small = cluster
    code, _ = identities(str(run_copy), "--ray-address", c.address, "--ray-resources", '{"data": 1}',
                         "--ray-labels", '{"zone": "data"}')
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "submitted as Ray task" in err and f"on node {data_node.node_id}" in err
    assert small.node_id not in err.split("faces ->", 1)[1]
    assert out.strip() == f"{run_copy}/identities.parquet"
    local = identity_run["run"]
    for name in OUTPUTS:
        ours, theirs = pq.read_table(run_copy / name), pq.read_table(local / name)
        assert ours.equals(theirs), name
        assert (run_copy / name).read_bytes() == (local / name).read_bytes(), name


def test_a_label_no_node_has_and_a_folder_the_node_cannot_see_are_refused(cluster, data_node, run_copy,
                                                                          tmp_path, capsys):
    c, _ = cluster
    code, seconds = identities(str(run_copy), "--ray-address", c.address, "--ray-labels", '{"zone": "elsewhere"}')
    err = capsys.readouterr().err
    assert code == 2 and "label zone=elsewhere" in err and "label zone=data" in err, err
    assert seconds < 120

    code, _ = identities(str(tmp_path / "nowhere"), "--ray-address", c.address)
    err = capsys.readouterr().err
    assert code == 1 and "on node" in err and str(tmp_path / "nowhere") in err, err

    code, _ = identities(str(run_copy), "--ray-address", c.address, "--ray-resources", '{"data": -1}')
    err = capsys.readouterr().err
    assert code == 2 and "--ray-resources: must be a JSON object of positive numbers" in err, err


def test_a_run_name_is_found_under_the_manifests_root_on_the_node(cluster, data_node, run_copy, tmp_path,
                                                                  monkeypatch, capsys):
    c, _ = cluster
    monkeypatch.chdir(tmp_path / "..")  # not where the run is: the name must not become <cwd>/run
    code, _ = identities("run", "--manifests-root", str(tmp_path), "--ray-address", c.address,
                         "--ray-resources", '{"data": 1}')
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"{run_copy}/identities.parquet"


def test_on_a_bucket_the_task_reads_and_writes_the_run_folder_there(identity_run, run_copy, local_s3, capsys):
    """``local``: a private Ray here, which forwards the bucket's endpoint and credentials to its worker."""
    import fsspec

    from tests.local_s3 import clear_fs_cache

    bucket = local_s3.bucket("runs")
    clear_fs_cache()
    fs = fsspec.filesystem("s3")
    fs.put(f"{run_copy}/", f"s3://{bucket}/run/", recursive=True)
    fs.put(f"{identity_run['shards_dir']}/", f"s3://{bucket}/shards/", recursive=True)
    code, _ = identities(f"s3://{bucket}/run", "--shards-dir", f"s3://{bucket}/shards", "--ray-address", "local")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == f"s3://{bucket}/run/identities.parquet" and "on node" in err
    for name in OUTPUTS:
        with fs.open(f"s3://{bucket}/run/{name}", "rb") as f:
            ours = pq.read_table(f)
        assert ours.equals(pq.read_table(identity_run["run"] / name)), name

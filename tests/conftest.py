"""Shared fixtures. Tests are offline: tiny models are built on the fly from configs; spaCy and
all-MiniLM-L6-v2 are the real ones that registry packages ship."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.local_s3 import local_s3  # noqa: E402, F401 -- the local S3 server fixture, for every test module


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """A session-wide folder where tiny models are built (each at most once, on first use).
    ``SUBJECT_FFHQ_TEST_TINY_MODELS=DIR`` keeps them in DIR across sessions (built there if missing)."""
    kept = os.environ.get("SUBJECT_FFHQ_TEST_TINY_MODELS")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one folder for all workers of this run (pytest -n)
        shared = tmp_path_factory.getbasetemp().parent / "tiny-models"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_models_root):
    """``tiny_model("blip2")`` -> path of that tiny model, built on first request (by one process:
    test workers that share the folder wait for the one building it)."""
    from filelock import FileLock

    from fixtures.tiny_models import build_one

    def get(name: str) -> Path:
        path = tiny_models_root / name
        if not (path / ".complete").exists():
            with FileLock(str(tiny_models_root / f".lock-{name}")):
                build_one(name, tiny_models_root)  # returns at once when another worker just built it
        return path

    return get


@pytest.fixture(scope="session")
def tiny_models_all(tiny_models_root, tiny_model) -> Path:
    """Every tiny model built; returns the folder that ``{tiny}`` in the tiny profile stands for."""
    from fixtures.tiny_models import BUILDERS

    for name in BUILDERS:
        tiny_model(name)
    return tiny_models_root


@pytest.fixture
def tiny_profile(tiny_models_all, monkeypatch):
    """The ``tiny`` profile with ``{tiny}`` pointing at the session's tiny models."""
    from datagen.config import TINY_MODELS_ENV, load_profile

    monkeypatch.setenv(TINY_MODELS_ENV, str(tiny_models_all))
    return load_profile("tiny")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models run fastest so on a shared CPU: no thread
    oversubscription), restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    """The bundled FFHQ-wild-layout sample, built once per session."""
    from fixtures.bundled_photos import build_sample

    root = tmp_path_factory.mktemp("sample")
    build_sample(root)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session, shared by every test that needs Ray (starting
    Ray costs seconds). Tests that need a cluster of their own run last (see below) and end it."""
    import ray

    if not ray.is_initialized():
        for attempt in range(3):
            try:
                ray.init(address="local", num_cpus=4, include_dashboard=False)
                break
            except Exception:  # noqa: BLE001 -- on a loaded machine the raylet can miss its start-up deadline
                ray.shutdown()
                if attempt == 2:
                    raise
    yield
    ray.shutdown()


def pytest_collection_modifyitems(session, config, items):
    """The end-to-end builds (on the shared Ray's stage actors) run first, so that under ``-n 2``
    (``make test``) the longest module starts at once and the rest share the other worker; tests
    that start their own (multi-node) Ray cluster run after every test on the shared one."""
    def rank(item) -> int:
        if "own_ray_cluster" in item.keywords:
            return 2
        return 0 if "tiny_stage_pools" in getattr(item, "fixturenames", ()) else 1

    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture(scope="module")
def tiny_stage_pools(ray_local, tiny_models_all):
    """The tiny profile's stage actors on the shared Ray, started once per module (loading the models
    once) and handed to every build of the module whose stage settings are the tiny profile's
    (``BuildRequest.pools``); overlays may change ``shards:`` and ``ray:`` but not the stages.
    Stopped at the module's end: they hold most of the shared Ray's CPUs, which later modules (Ray
    Train) need."""
    import ray

    from datagen.config import TINY_MODELS_ENV, load_profile
    from ray_jobs.pool import StagePools
    from ray_jobs.settings import resolve_settings

    old = os.environ.get(TINY_MODELS_ENV)
    os.environ[TINY_MODELS_ENV] = str(tiny_models_all)
    try:
        profile = load_profile("tiny")
    finally:
        if old is None:
            os.environ.pop(TINY_MODELS_ENV, None)
        else:
            os.environ[TINY_MODELS_ENV] = old
    pools = StagePools.start(resolve_settings(profile, ray.cluster_resources()), profile)
    yield pools
    pools.shutdown()



@pytest.fixture(scope="session")
def identity_run(sample_source, tmp_path_factory) -> dict:
    """A run of the bundled sample with identities, pairs and the reference set (tests.identity_run),
    built once per session (real MTCNN and dlib weights)."""
    from tests.identity_run import make_identity_run

    return make_identity_run(sample_source, tmp_path_factory.mktemp("identity-run"))

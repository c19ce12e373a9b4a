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


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """A session-wide folder where tiny models are built (each at most once, on first use).
    ``SUBJECT_FFHQ_TEST_TINY_MODELS=DIR`` keeps them in DIR across sessions (built there if missing)."""
    kept = os.environ.get("SUBJECT_FFHQ_TEST_TINY_MODELS")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_model(tiny_models_root):
    """``tiny_model("blip2")`` -> path of that tiny model, built on first request."""
    from fixtures.tiny_models import build_one

    def get(name: str) -> Path:
        path = tiny_models_root / name
        if not (path / ".complete").exists():
            build_one(name, tiny_models_root)
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


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    """The bundled FFHQ-wild-layout sample, built once per session."""
    from fixtures.bundled_photos import build_sample

    root = tmp_path_factory.mktemp("sample")
    build_sample(root)
    return root


@pytest.fixture(scope="session")
def _shared_ray():
    """Shuts down, at the end of the session, the local Ray that :func:`ray_local` started."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_shared_ray):
    """A local Ray (2 CPUs) shared by every module that asks for it: started on first use, kept
    until the session ends. A test that needs its own Ray calls ``ray.shutdown()`` first; the next
    module that asks for this one starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield

"""The one way the project starts or joins Ray.

Without an address a *private* local instance is started for this command (``address="local"``),
never another user's instance that happens to run on the machine; with ``--ray-address`` or
``$RAY_ADDRESS`` that cluster is joined. A local instance gets the environment the command runs
with (model cache, offline switches) forwarded to its workers; a cluster's nodes have their own
(``cluster.example.yaml``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Environment variables a local run forwards to its Ray workers, so that they see the same model
# cache and offline switches as the command.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE", "TOKENIZERS_PARALLELISM", "SUBJECT_FFHQ_TINY_MODELS",
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def connect_ray(address: str | None = None, include_dashboard: bool = False) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS``, or start a private local Ray. Returns True if this call
    started or joined Ray (the caller then shuts it down), False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
    else:
        env = forwarded_env()
        ray.init(address="local", include_dashboard=include_dashboard, runtime_env={"env_vars": env} if env else None)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, include_dashboard: bool = False) -> Iterator[None]:
    """Ray connected for the ``with`` block; shut down after it if this block started it."""
    import ray

    started = connect_ray(address, include_dashboard)
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()

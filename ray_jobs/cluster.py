"""The one way the project starts or joins Ray.

Without an address a *private* local instance is started for this command (``address="local"``),
never another user's instance that happens to run on the machine; with ``--ray-address`` or
``$RAY_ADDRESS`` that cluster is joined. A local instance gets the environment the command runs
with (model cache, offline switches) forwarded to its workers; a cluster's nodes have their own
(``cluster.example.yaml``).

Joining is bounded: before ``ray.init`` (which can wait many minutes, deaf to Ctrl-C, on an
address where nothing answers) the address is probed with plain TCP connections, retried until
``connect_timeout_s`` (the profile's ``ray.connect_timeout_s``); then :class:`RayConnectError`
names the address. The probe sleeps in short steps, so Ctrl-C stops it at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator

from datagen.config import RaySettings

DEFAULT_CONNECT_TIMEOUT_S = RaySettings().connect_timeout_s

# Environment variables forwarded to Ray workers (a local Ray's, and the Ray Train workers), so that
# they see the same model cache and offline switches as the command, and the same object store
# (endpoint, region, profile, credential *files*: datagen/storage.py). Secrets are never forwarded: a
# runtime env is written to Ray's logs and job table, and a joined cluster would receive them. A local
# Ray's workers inherit the command's environment, credentials included; a cluster's nodes have their
# own (cluster.example.yaml).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE", "TORCH_HOME", "TOKENIZERS_PARALLELISM", "SUBJECT_FFHQ_TINY_MODELS",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "FSSPEC_S3_ENDPOINT_URL",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME",
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


class RayConnectError(ConnectionError):
    """Nothing answered at the Ray address within the connect timeout."""


def ray_address(address: str | None = None) -> str | None:
    """The cluster to join: ``address``, else ``$RAY_ADDRESS``, else None (a private local Ray, also
    what ``local`` asks for)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def wait_for_address(address: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Return once something accepts TCP connections at ``address`` (``host:port`` or
    ``ray://host:port``); raise :class:`RayConnectError` after ``timeout_s`` seconds of trying.
    Addresses without a port (``auto``) are left to Ray."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(target, timeout=max(0.1, min(2.0, left))):
                return
        except OSError as e:
            why = e.strerror or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayConnectError(
                f"no Ray cluster answered at {address} within {timeout_s:g} s ({why}); check --ray-address / "
                f"$RAY_ADDRESS (unset it to run on a private local Ray), or raise ray.connect_timeout_s"
            )
        time.sleep(min(0.5, left))


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def connect_ray(
    address: str | None = None, include_dashboard: bool = False, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> bool:
    """Join ``address`` / ``$RAY_ADDRESS`` (waiting at most ``connect_timeout_s`` for it to answer),
    or start a private local Ray. Returns True if this call started or joined Ray (the caller then
    shuts it down), False if Ray was already initialised."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return False
    address = ray_address(address)
    if address:
        wait_for_address(address, connect_timeout_s)  # before importing Ray: seconds saved on a bad address
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
    else:
        env = forwarded_env()
        ray.init(address="local", include_dashboard=include_dashboard, runtime_env={"env_vars": env} if env else None)
    return True


@contextlib.contextmanager
def ray_session(
    address: str | None = None, include_dashboard: bool = False, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> Iterator[None]:
    """Ray connected for the ``with`` block; shut down after it if this block started it."""
    started = connect_ray(address, include_dashboard, connect_timeout_s)
    try:
        yield
    finally:
        if started:
            import ray

            if ray.is_initialized():
                ray.shutdown()

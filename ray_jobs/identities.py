"""``subject-ffhq identities RUN --ray-address ADDR``: the whole identities step as one Ray task on a
cluster node, next to the data, not on the driver.

    result = run_identities_on_ray(request, on_event=print)

1. Ray is joined through :func:`ray_jobs.cluster.ray_session` (``local``: a private Ray here).
2. The placement is checked against the cluster's live nodes (CPUs, custom resources, node labels): a
   cluster where no node could ever run the task is refused at once (:class:`PlacementError`, listing
   the nodes), never left pending.
3. A small task placed like the step (same CPUs, resources and labels, no memory request) finds the run
   folder *on the node* (a path there, e.g. a shared filesystem, or a bucket URL), counts its faces from
   the face tables' Parquet footers and returns the memory the step asks for
   (:func:`datagen.identity.step.step_size`); the placement is checked again with that memory.
4. The step itself (:func:`datagen.identity.step.run_identity_step`: index, split, pairs,
   ``identities.json``, the reference set) runs as one task with ``num_cpus``, that ``memory``, the
   custom ``resources`` and the ``label_selector``; it returns its figures and the node that ran it.

A run folder the node cannot see fails with :class:`NodeError`, naming the node and the path. Ctrl-C
cancels the task (``ray.cancel(force=True)``): every file the step writes is written atomically, so a
cancelled step leaves each file whole, old or new; re-run the command.

Placement on the node that holds the data, as Ray supports it: a *custom resource* (``ray start
--resources '{"data": 1}'`` on that node, ``--ray-resources '{"data": 1}'`` here) or a *label selector*
(``ray start --labels data-zone=eu``, ``--ray-labels '{"data-zone": "eu"}'``; values ``v``, ``!v``,
``in(a,b)``, ``!in(a,b)``; every node has ``ray.io/node-id``). Ray's labels are beta (2.49+).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datagen import storage
from datagen.identity.step import IdentityStepResult, StepSize, run_identity_step, step_size
from datagen.manifests.run_manifest import load_run_manifest, resolve_run_dir
from ray_jobs.cluster import DEFAULT_CONNECT_TIMEOUT_S, ray_session

GB = 1e9


class PlacementError(ValueError):
    """No live node of the cluster can run the identities task as asked."""


class NodeError(ValueError):
    """The identities task failed on its node; the message names the node."""


@dataclass(frozen=True)
class Placement:
    num_cpus: float = 2.0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {"data": 1}
    labels: dict[str, str] = field(default_factory=dict)  # a Ray label selector, e.g. {"data-zone": "eu"}

    def options(self, memory: int = 0) -> dict[str, Any]:
        """The task's Ray options."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "max_retries": 0}
        if memory:
            opts["memory"] = int(memory)
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.labels:
            opts["label_selector"] = dict(self.labels)
        return opts

    def describe(self, memory: int = 0) -> str:
        parts = [f"{self.num_cpus:g} CPU"] + ([f"{memory / GB:.2f} GB memory"] if memory else [])
        parts += [f"{k}={v:g}" for k, v in sorted(self.resources.items())]
        parts += [f"label {k}={v}" for k, v in sorted(self.labels.items())]
        return ", ".join(parts)


@dataclass
class IdentitiesRequest:
    run: str  # a run folder or a run name under manifests_root, as the node sees it
    manifests_root: str
    address: str  # a cluster address, or "local"
    threshold: float | None = None
    shards_dir: str | None = None
    references: bool = True
    placement: Placement = field(default_factory=Placement)
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.node_id} ({self.hostname}, {self.address})"


@dataclass
class RayIdentitiesResult:
    step: IdentityStepResult
    size: StepSize
    node: NodeInfo
    seconds: float  # from submission to the result, on the driver


def this_node() -> NodeInfo:
    import socket

    import ray

    return NodeInfo(ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), socket.gethostname())


def size_on_node(run: str, manifests_root: str) -> tuple[str, StepSize, NodeInfo, str | None]:
    """On a node: the run folder as it sees it, the step's size, the node, the ``shards_dir`` its
    run.json names (as written: maybe relative)."""
    node = this_node()
    try:
        run_dir = resolve_run_dir(run, manifests_root)
        return storage.text(run_dir), step_size(run_dir), node, load_run_manifest(run_dir).get("shards_dir")
    except (OSError, ValueError) as e:
        raise NodeError(f"on node {node}: {e}") from None


def step_on_node(run_dir: str, threshold: float | None, shards_dir: str | None,
                 references: bool) -> tuple[IdentityStepResult, NodeInfo]:
    """On a node: the whole identities step."""
    node = this_node()
    if not storage.path(run_dir).is_dir():
        raise NodeError(f"node {node} cannot see the run folder {run_dir}: give a path every node sees "
                        "(a shared filesystem) or a bucket URL")
    try:
        return run_identity_step(run_dir, threshold, shards_dir, references), node
    except (OSError, ValueError) as e:
        raise NodeError(f"on node {node}: {e}") from None


def label_matches(selector: str, value: str | None) -> bool:
    """A Ray label selector value (``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``) against a node's label."""
    negate = selector.startswith("!")
    body = selector[1:] if negate else selector
    allowed = {v.strip() for v in body[3:-1].split(",")} if body.startswith("in(") and body.endswith(")") else {body}
    return (value in allowed) != negate


def fits(node: dict, placement: Placement, memory: int) -> bool:
    """Whether a live node of ``ray.nodes()`` can ever hold the task (its total resources, its labels)."""
    total, labels = node.get("Resources") or {}, node.get("Labels") or {}
    wanted = {"CPU": placement.num_cpus, "memory": memory, **placement.resources}
    return all(total.get(k, 0.0) >= v for k, v in wanted.items() if v) and all(
        label_matches(sel, labels.get(key)) for key, sel in placement.labels.items())


def check_placement(nodes: list[dict], placement: Placement, memory: int = 0) -> None:
    """:class:`PlacementError` unless some live node fits, naming what was asked and what each node has."""
    alive = [n for n in nodes if n.get("Alive")]
    if any(fits(n, placement, memory) for n in alive):
        return
    has = "; ".join(_node_line(n, placement) for n in alive) or "no live node"
    raise PlacementError(f"no node of the Ray cluster can run the identities step: it needs "
                         f"{placement.describe(memory)} on one node; the nodes have: {has}")


def _node_line(node: dict, placement: Placement) -> str:
    total, labels = node.get("Resources") or {}, node.get("Labels") or {}
    parts = [f"{total.get('CPU', 0):g} CPU", f"{total.get('memory', 0) / GB:.2f} GB memory"]
    parts += [f"{k}={total.get(k, 0):g}" for k in sorted(placement.resources)]
    parts += [f"label {k}={labels.get(k, '(none)')}" for k in sorted(placement.labels)]
    return f"{node.get('NodeID', '?')[:12]} ({', '.join(parts)})"


def wait_for(ref, on_interrupt: Callable[[], None] | None = None):
    """``ray.get(ref)`` in short waits (Ctrl-C is seen at once and cancels the task); a task's own
    error is raised as itself, not wrapped; any other Ray error (the task's worker killed for memory,
    its node lost) as a one-line :class:`NodeError`."""
    import ray

    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            pass
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        if on_interrupt:
            on_interrupt()
        raise
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, BaseException) else e) from None
    except ray.exceptions.RayError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise NodeError(f"the identities task failed on the cluster: {type(e).__name__}: {first}") from None


def absolute(path: str | None) -> str | None:
    """A local path made absolute on the driver (a bucket URL, or None, as it is)."""
    return path if path is None or storage.is_url(path) else os.path.abspath(path)


def run_argument(run: str) -> str:
    """RUN as the node should look it up: a path (it has a separator, or exists here) made absolute on
    the driver; a run *name* left as it is, for the node to find under ``--manifests-root``."""
    if storage.is_url(run) or not (os.sep in run or "/" in run or os.path.exists(run)):
        return run
    return os.path.abspath(run)


def run_identities_on_ray(request: IdentitiesRequest, on_event: Callable[[str], None] = print) -> RayIdentitiesResult:
    """Join the cluster, check the placement, size the step on a node, run it there (see the module)."""
    import ray

    run, manifests_root = run_argument(request.run), absolute(request.manifests_root)
    placement = request.placement
    with ray_session(request.address, connect_timeout_s=request.connect_timeout_s):
        try:
            probe = ray.remote(size_on_node).options(**placement.options())
        except ValueError as e:  # a malformed label selector or resource
            raise PlacementError(f"--ray-labels / --ray-resources: {e}") from None
        check_placement(ray.nodes(), placement)
        run_dir, size, seen_by, run_shards_dir = wait_for(probe.remote(run, manifests_root))
        shards_dir = absolute(request.shards_dir or run_shards_dir)  # a relative one: as the driver sees it
        check_placement(ray.nodes(), placement, size.memory_bytes)
        ref = ray.remote(step_on_node).options(**placement.options(size.memory_bytes)).remote(
            run_dir, request.threshold, shards_dir, request.references)
        on_event(f"{run_dir} (as node {seen_by.node_id[:12]} sees it): {size.faces} faces; submitted as Ray task "
                 f"{ref.task_id().hex()} asking for {placement.describe(size.memory_bytes)} (Ctrl-C cancels it)")
        started = time.perf_counter()
        step, node = wait_for(ref, lambda: on_event("interrupted: the identities task was cancelled"))
        return RayIdentitiesResult(step, size, node, round(time.perf_counter() - started, 3))

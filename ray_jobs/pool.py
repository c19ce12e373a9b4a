"""A pool of identical stage actors, placed as the settings say, taking calls round-robin.

Ray restarts a crashed actor (``max_restarts``) and replays the calls it lost
(``max_task_retries``); when an actor is beyond that (its restarts used up), :meth:`StagePool.heal`
replaces it with a fresh one so later shards still have the full pool.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

import ray

from datagen import stage_table
from datagen.config import Profile
from datagen.stage_table import Stage
from ray_jobs.settings import BuildSettings, StagePlacement


class StageStartError(RuntimeError):
    """A stage's actors could not start (missing model, unplaceable resources); the message says why."""


class StagePool:
    def __init__(self, placement: StagePlacement, actor_class: type, init_args: tuple, settings: BuildSettings):
        self.stage = placement.stage
        self.placement = placement
        self._remote = ray.remote(actor_class).options(
            num_cpus=placement.num_cpus,
            num_gpus=placement.num_gpus,
            max_restarts=settings.actor_max_restarts,
            max_task_retries=settings.actor_max_task_retries,
            scheduling_strategy=settings.scheduling_strategy,
        )
        self._init_args = init_args
        self.actors = [self._remote.remote(*init_args) for _ in range(placement.replicas)]
        self._turn = itertools.cycle(range(len(self.actors)))

    def call(self, *args: Any) -> ray.ObjectRef:
        """Submit ``run(*args)`` to the next actor in turn; returns the result's ref."""
        return self.actors[next(self._turn)].run.remote(*args)

    def wait_ready(self, timeout_s: float) -> list[dict]:
        """Block until every actor has loaded its model; raise :class:`StageStartError` if one cannot."""
        refs = [a.ready.remote() for a in self.actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise StageStartError(
                f"{self.stage}: {len(pending)} of {len(refs)} actor(s) did not start within {timeout_s:.0f}s; each asks "
                f"for num_gpus={self.placement.num_gpus}, num_cpus={self.placement.num_cpus} and the cluster has "
                f"{ray.cluster_resources()} (available now: {ray.available_resources()}). Lower "
                f"ray.stages.{self.stage}.num_gpus/num_cpus/replicas, or add nodes."
            )
        try:
            return ray.get(done)
        except ray.exceptions.RayError as e:
            raise StageStartError(f"{self.stage}: could not start its actor: {root_cause(e)}") from None

    def heal(self, timeout_s: float = 60.0) -> int:
        """Replace actors that are dead for good; returns how many were replaced."""
        replaced = 0
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.ready.remote(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                continue  # busy or restarting, not dead
            except ray.exceptions.RayActorError:
                self.actors[i] = self._remote.remote(*self._init_args)
                replaced += 1
        return replaced

    def stats(self, timeout_s: float) -> list[dict]:
        """Every live actor's :meth:`~ray_jobs.actors.StageActor.stats`."""
        refs = [a.stats.remote() for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in done:
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayError:
                pass  # a dead actor's counts died with it
        return out

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


class StagePools:
    """The stage pools of a build, one per stage of its table. A build starts the pools it lacks and
    shuts those down at its end; a caller that runs several builds in one Ray session (a notebook, the
    test suite) can start them once with :meth:`start` and hand them to each build
    (``BuildRequest.pools``): a build uses every handed pool whose key fits its own settings and
    neither restarts nor stops it."""

    def __init__(self, pools: dict[str, StagePool], keys: dict[str, str]):
        self.pools = pools
        self.keys = keys  # per stage: what its actors were built from (placement and sections)

    @classmethod
    def start(cls, settings: BuildSettings, profile: Profile, stages: tuple[Stage, ...] | None = None) -> StagePools:
        """Start one pool per stage of ``stages`` (default: the profile's)."""
        from ray_jobs.actors import StageActor

        stages = stage_table.stages_for(profile) if stages is None else stages
        pools = {st.name: StagePool(settings.stages[st.name], StageActor, (st, profile), settings) for st in stages}
        return cls(pools, {st.name: pool_key(st, settings, profile) for st in stages})

    def fitting(self, settings: BuildSettings, profile: Profile, stages: tuple[Stage, ...]) -> dict[str, StagePool]:
        """The pools that can serve a build with these settings, by stage name."""
        return {st.name: self.pools[st.name] for st in stages
                if st.name in self.pools and self.keys[st.name] == pool_key(st, settings, profile)}

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()


def pool_key(stage: Stage, settings: BuildSettings, profile: Profile) -> str:
    """A stage's pool built under one key serves any build with the same key."""
    sections = {name: dataclasses.asdict(profile.section(name)) for name in stage.sections}
    return json.dumps({"stage": dataclasses.asdict(stage), "placement": vars(settings.stages[stage.name]), **sections},
                      sort_keys=True, default=str)


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Failure|Interrupt|Exit))(?::\s?(.*))?$")


def root_cause(error: BaseException) -> str:
    """The innermost useful message of a Ray error, on one line: the stage's own exception
    (``ModelNotFoundError: ...``) when there is one, else the Ray error's own message."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        return " ".join(f"{type(cause).__name__}: {cause}".split())
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # Ray wraps the original traceback; the original exception starts at its last "Type: message" line.
    for i in range(len(lines) - 1, -1, -1):
        m = _EXCEPTION_LINE.match(lines[i])
        if m:
            return " ".join(" ".join([f"{m.group(1)}: {m.group(2) or ''}", *lines[i + 1 :]]).split())
    return " ".join(f"{type(error).__name__}: {' '.join(lines)}".split())

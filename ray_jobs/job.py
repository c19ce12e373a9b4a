"""The dataset job's driver: plan shards, skip finished ones, stream the rest through Ray, account.

The shard is the unit of work, failure and resume. The driver plans the shards, skips finished ones,
starts the stage actor pools (``pool.py``: one pool per row of the stage table,
:mod:`datagen.stage_table`) and hands the rest to the streaming scheduler (``scheduler.py``: load,
the stages, encode and write, with bounded work in flight); for each shard the scheduler is done
with, it writes the shard's manifest entry, last, after its tar. It ends with ``run.json``
(:class:`datagen.manifests.run_manifest.RunManifest`) and the manifest tables.

Faults: Ray retries crashed tasks (``task_max_retries``) and restarts crashed actors, replaying
their calls (``actor_max_restarts`` / ``actor_max_task_retries``); lost objects are rebuilt from
lineage. A shard whose graph still fails is retried whole, up to ``shard_attempts`` times, then
recorded as failed (every item named, with the reason) and the run goes on. An image that cannot
be decoded, or that one stage cannot process, fails alone; its shard completes.

Resume: a shard whose entry exists and whose tar has the recorded size and sha256 is skipped;
the others are redone, after the temp files a killed run left (tars and manifest entries) are
removed. Shard membership is a pure function of the source and the shard size and each shard's
bytes a pure function of its items, so a resumed run writes what an uninterrupted one would have.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ray

from datagen import stage_table, storage
from datagen.config import Profile
from datagen.files import remove_stale_temps
from datagen.manifests import shard_entry
from datagen.manifests.face_table import shard_table_path, write_shard_table
from datagen.manifests.run_manifest import RunManifest, check_run_name
from datagen.manifests.shard_entry import ManifestError, account
from datagen.manifests.tables import SAMPLES_TABLE, write_manifest_tables
from datagen.shards.plan import ShardSpec, plan_shards, source_order
from datagen.sources.image_folder import describe_skipped
from datagen.sources.items import SourceError
from datagen.sources.readers import open_source
from ray_jobs.hooks import JobHooks
from ray_jobs.pool import StagePool, StagePools, StageStartError
from ray_jobs.progress import ProgressReporter
from ray_jobs.scheduler import ShardOutcome, ShardScheduler
from ray_jobs.settings import BuildSettings, SettingsError, config_digest, resolve_settings
from ray_jobs.tasks import write_shard_tar

COMPLETE, INCOMPLETE, INTERRUPTED, FAILED = "complete", "incomplete", "interrupted", "failed"
EXIT_CODES = {COMPLETE: 0, INCOMPLETE: 1, INTERRUPTED: 130, FAILED: 1}
# Errors found before anything is written (bad source, settings, models, an older run's manifests):
# raised to the caller as they are, which says so in one line (the CLI: exit code 2).
SETUP_ERRORS = (SourceError, SettingsError, ManifestError, StageStartError)


class RunInterrupted(Exception):
    """The run stopped before every shard was finished (Ctrl-C, or the testing hook)."""


@dataclass
class BuildRequest:
    source: Path
    out: Path
    profile: Profile
    run_name: str
    manifests_root: Path = Path("manifests")
    limit: int | None = None
    command_line: list[str] = field(default_factory=list)
    hooks: JobHooks = field(default_factory=JobHooks)
    pools: StagePools | None = None  # started by the caller and kept running after the build

    def __post_init__(self) -> None:
        check_run_name(self.run_name)

    @property
    def run_dir(self) -> Path:
        return storage.path(self.manifests_root) / self.run_name

    @property
    def shards_dir(self) -> Path:
        return storage.path(self.out) / "shards"


@dataclass
class BuildSummary:
    run_dir: Path
    status: str
    counts: dict[str, Any]
    shards_run: int
    shards_skipped: int
    shards_failed: int
    seconds: float
    error: str | None = None  # status "failed": what stopped the driver

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class BuildJob:
    """One invocation of the job. Needs a connected Ray (``ray.init`` done by the caller)."""

    def __init__(
        self,
        request: BuildRequest,
        on_shard_done: Callable[[dict[str, Any], BuildJob], None] | None = None,
        out: TextIO | None = None,
    ):
        if not ray.is_initialized():
            raise RuntimeError("BuildJob needs Ray: call ray.init(...) first")
        self.request = request
        self.on_shard_done = on_shard_done
        self.out = out or sys.stdout
        self.profile = request.profile
        self.stages = stage_table.stages_for(self.profile)
        # the stages that keep a table per shard beside the run (Step.shard_table), e.g. the face embeddings
        self.tabled = [(st.name, step) for st in self.stages if (step := st.step_class()).shard_table]
        self.settings: BuildSettings = resolve_settings(self.profile, ray.cluster_resources())
        self.hooks = request.hooks
        self.digest = config_digest(self.profile)
        self.models = stage_table.model_ids(self.profile)
        self.pools: dict[str, StagePool] = {}
        self.own_pools: StagePools | None = None  # the pools this build started (and stops)
        self.stats_before: dict[str, dict[str, tuple[int, float]] | None] = {}
        self.actor_info: dict[str, list[dict]] = {}
        self.entries: dict[int, dict[str, Any]] = {}
        self.shards_run = self.shards_failed = self.retries = 0
        self.stream_seconds = 0.0  # time spent streaming shards, after the actors were ready
        self.stage_rates: dict[str, Any] = {}
        self.cpu_seconds = {"load": 0.0, "encode": 0.0, "write": 0.0, "images": 0}
        req = request
        self.manifest = RunManifest(
            run=req.run_name, run_dir=req.run_dir, out=req.out, shards_dir=req.shards_dir,
            profile_name=self.profile.name, config=self.profile.to_dict(), config_digest=self.digest,
            models=self.models, shard_size=self.settings.shard_size, command_line=list(req.command_line),
            fault_drill=self.hooks.describe() or None, source_path=req.source, limit=req.limit,
        )

    # ---------------------------------------------------------------------------------- run
    def run(self) -> BuildSummary:
        """Run the job. Setup errors (:data:`SETUP_ERRORS`) are raised before anything is written;
        any other error ends the run as ``failed``: ``run.json`` says so with the reason, no temp
        file is left, and the summary (exit code 1) carries the reason."""
        self.t0 = time.monotonic()
        self.plan = self.progress = None
        try:
            return self._run()
        except SETUP_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 -- recorded in run.json and returned as a failed run
            return self.fail(e)

    def _run(self) -> BuildSummary:
        req, s = self.request, self.settings
        items = self.open_and_plan()
        todo = self.resume()
        progress = self.progress = ProgressReporter(len(self.plan), len(items), s.progress_interval_s, self.out)
        progress.already_done([self.entries[k] for k in sorted(self.entries)])
        status = COMPLETE
        if todo:
            try:
                self.start_pools()
                self.stream(todo, progress)
            except (KeyboardInterrupt, RunInterrupted) as e:
                status = INTERRUPTED
                self.say(f"interrupted ({e or 'Ctrl-C'}); finished shards are kept, re-run the same command to resume")
            finally:
                progress.close()  # the live bar, on a terminal
                self.stage_rates = self.collect_stage_rates()
                if self.own_pools is not None:
                    self.own_pools.shutdown()
        else:
            self.say("nothing to do: every shard is already done")

        counts = account(self.plan, self.entries)
        if status == COMPLETE and counts["shards"]["failed"]:
            status = INCOMPLETE
        seconds = time.monotonic() - self.t0
        summary = BuildSummary(req.run_dir, status, counts, self.shards_run, len(self.plan) - len(todo), self.shards_failed, seconds)
        if todo or not (req.run_dir / "run.json").is_file():
            self.write_run_manifest(summary, progress)
        if todo or not (req.run_dir / SAMPLES_TABLE).is_file():
            tables = write_manifest_tables(req.run_dir)
            self.say(f"manifest tables: {tables.samples}, {tables.shards}, {tables.summary}")
        self.say_summary(summary)
        return summary

    def open_and_plan(self) -> list:
        """Open the source and plan its shards (``self.plan``); returns the planned items."""
        req, s = self.request, self.settings
        source = open_source(req.source)
        self.manifest.source_path, self.manifest.source_type = source.root, source.name
        items = source.items()
        if req.limit is not None:
            items = sorted(items, key=source_order)[: req.limit]
        self.plan = plan_shards(items, s.shard_size)
        self.say(
            f"source {source.root} ({source.name}): {len(items)} images -> {len(self.plan)} shard(s) of up to "
            f"{s.shard_size}; out {req.out}, manifests {req.run_dir}"
        )
        self.manifest.skipped = list(getattr(source, "skipped", []))
        if self.manifest.skipped:
            self.say(f"the source passed over {len(self.manifest.skipped)} thing(s): "
                     f"{describe_skipped(self.manifest.skipped)} (all in run.json)")
        if not any(p.num_gpus for p in s.stages.values()):
            self.say(
                "no GPU for the stages (none in the Ray cluster, or num_gpus 0): the models run on CPU; "
                "on an autoscaling cluster set ray.stages.*.num_gpus to wait for GPU nodes"
            )
        if self.hooks.describe():
            self.say(self.hooks.describe())
        return items

    def resume(self) -> list[ShardSpec]:
        """Clear what killed runs left half-written; the shards still to do (the others' entries kept)."""
        req = self.request
        stale = self.remove_temps()
        if stale:
            self.say(f"removed {len(stale)} unfinished temp file(s) of an earlier run: {', '.join(p.name for p in stale)}")
        todo: list[ShardSpec] = []
        for spec in self.plan:
            entry = shard_entry.read_entry(req.run_dir, spec)
            done, why = shard_entry.resume_state(entry, spec, self.tar_path(spec), self.digest)
            missing = [step.shard_table for _, step in self.tabled
                       if not shard_table_path(req.run_dir, step.shard_table, spec.name).is_file()]
            if done and missing:
                done, why = False, f"its {missing[0]} table is missing"
            if done:
                self.entries[spec.index] = entry
            else:
                todo.append(spec)
                if entry is not None:
                    self.say(f"{spec.name}: redoing ({why})")
        return todo

    def remove_temps(self) -> list[Path]:
        """Every temp file a killed writer of this run left: tars, manifest entries, run files."""
        req = self.request
        folders = (req.shards_dir, req.run_dir / "shards", req.run_dir, *(req.run_dir / step.shard_table for _, step in self.tabled))
        return [p for folder in folders for p in remove_stale_temps(folder)]

    def tar_path(self, spec: ShardSpec) -> Path:
        tar = self.request.shards_dir / f"{spec.name}.tar"
        return tar.resolve() if isinstance(tar, Path) else tar

    # ------------------------------------------------------------------------------- actors
    def start_pools(self) -> None:
        """Use the caller's pools that fit this build's settings; start the others (and stop them at the end)."""
        s, given = self.settings, self.request.pools
        handed = given.fitting(s, self.profile, self.stages) if given is not None else {}
        missing = tuple(st for st in self.stages if st.name not in handed)
        if missing:
            self.own_pools = StagePools.start(s, self.profile, missing)
        self.pools = {st.name: handed.get(st.name) or self.own_pools.pools[st.name] for st in self.stages}
        for name, pool in self.pools.items():
            info = pool.wait_ready(s.actor_start_timeout_s)
            self.actor_info[name] = info
            pl = pool.placement
            where = ", ".join(f"{i['device']} on node {i['node_id'][:8]}" for i in info)
            self.say(f"{name}: {pl.replicas} actor(s) (num_gpus={pl.num_gpus}, num_cpus={pl.num_cpus}) ready: {where}")
        self.stats_before = {name: self.pool_totals(pool) for name, pool in handed.items()}

    # ------------------------------------------------------------------------------- stream
    def stream(self, todo: list[ShardSpec], progress: ProgressReporter) -> None:
        """Run the scheduler over ``todo`` and record each shard it is done with."""
        write_task = self.hooks.wrap_write_task(write_shard_tar)
        scheduler = ShardScheduler(self.settings, self.stages, self.pools, self.models, self.tar_path, write_task, progress)
        finished = 0
        progress.start()
        try:
            with closing(scheduler.stream(todo)) as outcomes:
                for outcome in outcomes:
                    self.record_shard(outcome, progress)
                    finished += 1
                    if self.hooks.stop_after(finished):
                        raise RunInterrupted(f"stopped by the caller's hooks after {finished} shard(s)")
        finally:
            self.stream_seconds = time.monotonic() - progress.started
            self.retries = scheduler.retries

    def record_shard(self, outcome: ShardOutcome, progress: ProgressReporter) -> None:
        """Write a finished shard's manifest entry (done or failed), after its tar."""
        spec, tar = outcome.spec, self.tar_path(outcome.spec)
        if outcome.written is None:
            entry = shard_entry.failed_entry(spec, tar, outcome.error, outcome.seconds, outcome.attempt, self.digest)
            self.shards_failed += 1
            remove_stale_temps(tar.parent, tar.name)  # a crashed attempt's partial tar
        else:
            written = outcome.written
            rows = written.pop("shard_rows", None) or {}
            for name, step in self.tabled:  # before the entry
                write_shard_table(self.request.run_dir, step.shard_table, spec.name, rows.get(name, []), step.shard_schema())
            entry = shard_entry.done_entry(spec, tar, written, outcome.seconds, outcome.attempt, self.digest)
            for k, v in (written.get("cpu_seconds") or {}).items():
                self.cpu_seconds[k] += v
            self.cpu_seconds["images"] += sum(1 for item in spec.items if item.duplicate_of is None)
        shard_entry.write_entry(self.request.run_dir, spec, entry)
        self.entries[spec.index] = entry
        self.shards_run += 1
        progress.shard_finished(entry)
        if self.on_shard_done is not None:
            self.on_shard_done(entry, self)

    def collect_stage_rates(self) -> dict[str, Any]:
        """Each stage's images and busy seconds, summed over its actors (what the throughput model uses)."""
        rates = {}
        for name, pool in self.pools.items():
            totals = self.pool_totals(pool)
            if totals is None:
                continue
            # Pools handed in by the caller have counted earlier builds too: subtract each actor's
            # counts from before this build, per incarnation (a restarted actor starts from zero).
            before = self.stats_before.get(name) or {}
            images = sum(n - before.get(k, (0, 0.0))[0] for k, (n, _) in totals.items())
            busy = sum(b - before.get(k, (0, 0.0))[1] for k, (_, b) in totals.items())
            rates[name] = {
                "replicas": len(totals),
                "images": images,
                "busy_seconds": round(busy, 3),
                "images_per_second_per_replica": round(images / busy, 3) if busy else None,
            }
        return rates

    @staticmethod
    def pool_totals(pool: StagePool) -> dict[str, tuple[int, float]] | None:
        """``{actor incarnation: (images, busy seconds)}`` of a pool's live actors."""
        try:
            stats = pool.stats(timeout_s=10)
        except ray.exceptions.RayError:
            return None
        return {st["incarnation"]: (st["images"], st["busy_seconds"]) for st in stats}

    def cpu_per_image(self) -> dict[str, float]:
        n = self.cpu_seconds["images"]
        return {k: round(v / n, 4) for k, v in self.cpu_seconds.items() if k != "images"} if n else {}

    # ----------------------------------------------------------------------------- failure
    def fail(self, error: Exception) -> BuildSummary:
        """End the run as ``failed``: clear temp files, record the reason in ``run.json``."""
        import traceback

        req = self.request
        reason = f"{type(error).__name__}: {error}"
        if self.own_pools is not None:  # already shut down when streaming had started; idempotent
            try:
                self.own_pools.shutdown()
            except Exception:  # noqa: BLE001 -- best effort, the run is failing anyway
                pass
        self.remove_temps()
        counts: dict[str, Any] = {}
        if self.plan is not None:
            try:
                counts = account(self.plan, self.entries)
            except Exception:  # noqa: BLE001 -- the accounting itself may be what failed
                counts = {}
        seconds = time.monotonic() - self.t0
        summary = BuildSummary(req.run_dir, FAILED, counts, self.shards_run, 0, self.shards_failed, seconds, error=reason)
        self.manifest.write(
            FAILED, counts, len(self.plan) if self.plan is not None else None, seconds, self.shards_run,
            error=reason, traceback="".join(traceback.format_exception(error)),
        )  # written atomically: no temp of its own left behind
        self.say(f"failed: {reason}; finished shards are kept, the reason is in {req.run_dir / 'run.json'}")
        return summary

    # ----------------------------------------------------------------------------- manifest
    def write_run_manifest(self, summary: BuildSummary, progress: ProgressReporter) -> None:
        stream = self.stream_seconds
        self.manifest.write(
            summary.status, summary.counts, len(self.plan), summary.seconds, summary.shards_run,
            shards_skipped=summary.shards_skipped,
            shards_failed=summary.shards_failed,
            shard_retries=self.retries,
            stream_seconds=round(stream, 3),
            images_processed=progress.images_this_run,
            images_per_second=round(progress.images_this_run / stream, 4) if stream else None,
            stage_rates=self.stage_rates,
            cpu_seconds_per_image=self.cpu_per_image(),
            settings=asdict(self.settings),
            ray={"cluster_resources": ray.cluster_resources(), "actors": self.actor_info},
        )

    def say_summary(self, summary: BuildSummary) -> None:
        counts = summary.counts
        self.say(
            f"{summary.status}: {counts['items']} source images: {counts['written']} written, {counts['duplicate']} duplicate, "
            f"{counts['failed']} failed, {counts['pending']} pending | shards: {counts['shards']} | {summary.seconds:.1f}s"
        )
        if self.stage_rates:
            rates = ", ".join(
                f"{name} {r['images_per_second_per_replica']} img/s per replica" for name, r in self.stage_rates.items()
            )
            self.say(f"stage rates (busy time only): {rates}; CPU per image: {self.cpu_per_image()}")
        if summary.status == INCOMPLETE:
            self.say(f"{counts['shards']['failed']} shard(s) failed; re-run the same command to retry them")

    def say(self, message: str) -> None:
        print(f"[build] {message}", file=self.out, flush=True)


def run_build(
    request: BuildRequest,
    on_shard_done: Callable[[dict[str, Any], BuildJob], None] | None = None,
    out: TextIO | None = None,
) -> BuildSummary:
    """Run the dataset job on the connected Ray cluster; see the module docstring."""
    return BuildJob(request, on_shard_done, out).run()

"""The dataset job's driver: plan shards, skip finished ones, stream the rest through Ray, account.

Per shard (the unit of work, failure and resume), for each chunk of its items::

    load_chunk (CPU task) ──► CaptionerActor.caption ──┐
                        └──► SegmenterActor.segment ──┴─► MatcherActor.match ─────┬─► encode_chunk (CPU task)
                                                  └────► FaceCheckerActor.check ──┘

and, once every chunk is encoded, ``write_shard_tar`` (CPU task) writes the tar; the driver then
writes the shard's manifest entry, last. The whole graph of a chunk is submitted at once as object
refs (Ray moves the data; nothing passes through the driver), and two bounds keep memory flat
whatever the source size: at most ``max_shards_in_flight`` shards are open, and at most
``max_chunks_in_flight`` chunks are between loading and encoding (encoded chunks are compact).

Faults: Ray retries crashed tasks (``task_max_retries``) and restarts crashed actors, replaying
their calls (``actor_max_restarts`` / ``actor_max_task_retries``); lost objects are rebuilt from
lineage. A shard whose graph still fails is retried whole, up to ``shard_attempts`` times, then
recorded as failed (every item named, with the reason) and the run goes on. An image that cannot
be decoded, or that one stage cannot process, fails alone; its shard completes.

Resume: a shard whose entry exists and whose tar has the recorded size and sha256 is skipped;
the others are redone. Shard membership is a pure function of the source and the shard size and
each shard's bytes a pure function of its items, so a resumed run writes what an uninterrupted
one would have.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ray

from datagen.config import Profile, model_ids
from datagen.files import TMP_MARK, remove_stale_temps
from datagen.manifests import shard_entry
from datagen.manifests.run_manifest import host_info, package_versions, write_run_manifest
from datagen.manifests.shard_entry import ManifestError, account
from datagen.manifests.tables import SAMPLES_TABLE, write_manifest_tables
from datagen.shards.plan import ShardSpec, plan_shards, source_order
from datagen.sources.readers import SourceError, SourceItem, describe_skipped, open_source
from ray_jobs import tasks as shard_tasks
from ray_jobs.hooks import JobHooks
from ray_jobs.pool import StagePool, StagePools, StageStartError, pools_key, root_cause
from ray_jobs.progress import ProgressReporter
from ray_jobs.settings import BuildSettings, SettingsError, config_digest, resolve_settings

COMPLETE, INCOMPLETE, INTERRUPTED, FAILED = "complete", "incomplete", "interrupted", "failed"
EXIT_CODES = {COMPLETE: 0, INCOMPLETE: 1, INTERRUPTED: 130, FAILED: 1}
# Errors found before anything is written (bad source, settings, models, an older run's manifests):
# raised to the caller as they are, which says so in one line (the CLI: exit code 2).
SETUP_ERRORS = (SourceError, SettingsError, ManifestError, StageStartError)
SKIPPED_KEPT = 1000  # things a source passed over, listed in run.json (the count is always there)


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
        return Path(self.manifests_root) / self.run_name

    @property
    def shards_dir(self) -> Path:
        return Path(self.out) / "shards"


def check_run_name(name: str) -> None:
    """A run name is one folder name inside the manifests folder; anything else is refused."""
    bad = (
        not isinstance(name, str) or not name.strip() or name in (".", "..")
        or any(c in name for c in ("/", "\\", "\0")) or Path(name).name != name
    )
    if bad:
        raise ValueError(
            f"run name {name!r} is not a plain folder name (no '/', '\\', not '.' or '..'): "
            "a run's manifests go to MANIFESTS/<run name>/ and nowhere else"
        )


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


@dataclass
class _ShardWork:
    spec: ShardSpec
    attempt: int
    chunks: list[list[SourceItem]]
    started: float = field(default_factory=time.monotonic)
    next_chunk: int = 0
    encoded: list = field(default_factory=list)
    write_ref: Any = None


# Module-level task bodies, so Ray workers import them by name.
def _load_task(shard: int, chunk: int, items: list[SourceItem], max_side: int, verify_pixel_md5: bool):
    return shard_tasks.load_chunk(shard, chunk, items, max_side, verify_pixel_md5)


def _encode_task(chunk, captions, panoptic, matched, faces, models: dict[str, str], jpeg_quality: int):
    return shard_tasks.encode_chunk(chunk, captions, panoptic, matched, models, jpeg_quality, faces)


def _write_task(spec: ShardSpec, tar_path: str, *chunks):
    return shard_tasks.write_shard_tar(spec, tar_path, *chunks)


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
        self.settings: BuildSettings = resolve_settings(self.profile, ray.cluster_resources())
        self.hooks = request.hooks
        self.digest = config_digest(self.profile)
        self.models = model_ids(self.profile)
        self.pools: dict[str, StagePool] = {}
        self.stats_before: dict[str, dict[str, tuple[int, float]] | None] = {}
        self.actor_info: dict[str, list[dict]] = {}
        self.entries: dict[int, dict[str, Any]] = {}
        self.shards_run = self.shards_failed = self.retries = 0
        self.stream_seconds = 0.0  # time spent streaming shards, after the actors were ready
        self.stage_rates: dict[str, Any] = {}
        self.cpu_seconds = {"load": 0.0, "encode": 0.0, "write": 0.0, "images": 0}

    # ---------------------------------------------------------------------------------- run
    def run(self) -> BuildSummary:
        """Run the job. Setup errors (:data:`SETUP_ERRORS`) are raised before anything is written;
        any other error ends the run as ``failed``: ``run.json`` says so with the reason, no temp
        file is left, and the summary (exit code 1) carries the reason."""
        self.started_wall, self.t0 = time.time(), time.monotonic()
        self.source = self.plan = self.progress = None
        self.skipped: list[dict[str, str]] = []
        try:
            return self._run()
        except SETUP_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 -- recorded in run.json and returned as a failed run
            return self.fail(e)

    def _run(self) -> BuildSummary:
        started_wall, t0 = self.started_wall, self.t0
        req, s = self.request, self.settings
        source = self.source = open_source(req.source)
        items = source.items()
        if req.limit is not None:
            items = sorted(items, key=source_order)[: req.limit]
        plan = self.plan = plan_shards(items, s.shard_size)
        self.say(
            f"source {source.root} ({source.name}): {len(items)} images -> {len(plan)} shard(s) of up to "
            f"{s.shard_size}; out {req.out}, manifests {req.run_dir}"
        )
        self.skipped = list(getattr(source, "skipped", []))
        if self.skipped:
            self.say(f"the source passed over {len(self.skipped)} thing(s): {describe_skipped(self.skipped)} (all in run.json)")
        if not any(p.num_gpus for p in s.stages.values()):
            self.say(
                "no GPU for the stages (none in the Ray cluster, or num_gpus 0): the models run on CPU; "
                "on an autoscaling cluster set ray.stages.*.num_gpus to wait for GPU nodes"
            )
        if self.hooks.describe():
            self.say(self.hooks.describe())

        stale = remove_stale_temps(req.shards_dir) if req.shards_dir.is_dir() else []
        if stale:
            self.say(f"removed {len(stale)} unfinished temp file(s) of an earlier run: {', '.join(p.name for p in stale)}")
        todo: list[ShardSpec] = []
        for spec in plan:
            entry = shard_entry.read_entry(req.run_dir, spec)
            done, why = shard_entry.resume_state(entry, spec, self.tar_path(spec), self.digest)
            if done:
                self.entries[spec.index] = entry
            else:
                todo.append(spec)
                if entry is not None:
                    self.say(f"{spec.name}: redoing ({why})")

        progress = self.progress = ProgressReporter(len(plan), len(items), s.progress_interval_s, self.out)
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
                if self.request.pools is None:
                    for pool in self.pools.values():
                        pool.shutdown()
        else:
            self.say("nothing to do: every shard is already done")

        counts = account(plan, self.entries)
        if status == COMPLETE and counts["shards"]["failed"]:
            status = INCOMPLETE
        seconds = time.monotonic() - t0
        summary = BuildSummary(req.run_dir, status, counts, self.shards_run, len(plan) - len(todo), self.shards_failed, seconds)
        if todo or not (req.run_dir / "run.json").is_file():
            self.write_run_manifest(source, plan, summary, started_wall, progress)
        if todo or not (req.run_dir / SAMPLES_TABLE).is_file():
            tables = write_manifest_tables(req.run_dir)
            self.say(f"manifest tables: {tables.samples}, {tables.shards}, {tables.summary}")
        self.say(
            f"{status}: {counts['items']} source images: {counts['written']} written, {counts['duplicate']} duplicate, "
            f"{counts['failed']} failed, {counts['pending']} pending | shards: {counts['shards']} | {seconds:.1f}s"
        )
        if self.stage_rates:
            rates = ", ".join(
                f"{name} {r['images_per_second_per_replica']} img/s per replica" for name, r in self.stage_rates.items()
            )
            self.say(f"stage rates (busy time only): {rates}; CPU per image: {self.cpu_per_image()}")
        if status == INCOMPLETE:
            self.say(f"{counts['shards']['failed']} shard(s) failed; re-run the same command to retry them")
        return summary

    def tar_path(self, spec: ShardSpec) -> Path:
        return (self.request.shards_dir / f"{spec.name}.tar").resolve()

    # ------------------------------------------------------------------------------- actors
    def start_pools(self) -> None:
        s = self.settings
        given = self.request.pools
        if given is not None and given.key != pools_key(s, self.profile):
            raise ValueError("BuildRequest.pools were started with other stage settings than this build's")
        self.pools = (given or StagePools.start(s, self.profile)).pools
        for name, pool in self.pools.items():
            info = pool.wait_ready(s.actor_start_timeout_s)
            self.actor_info[name] = info
            pl = pool.placement
            where = ", ".join(f"{i['device']} on node {i['node_id'][:8]}" for i in info)
            self.say(f"{name}: {pl.replicas} actor(s) (num_gpus={pl.num_gpus}, num_cpus={pl.num_cpus}) ready: {where}")
        if given is not None:
            self.stats_before = {name: self.pool_totals(pool) for name, pool in self.pools.items()}

    # ------------------------------------------------------------------------------- stream
    def stream(self, todo: list[ShardSpec], progress: ProgressReporter) -> None:
        s = self.settings
        opts = dict(num_cpus=s.task_num_cpus, max_retries=s.task_max_retries, scheduling_strategy=s.scheduling_strategy)
        load = ray.remote(_load_task).options(**opts)
        encode = ray.remote(_encode_task).options(**opts)
        write = ray.remote(self.hooks.wrap_write_task(_write_task)).options(**opts)

        pending: deque[tuple[ShardSpec, int]] = deque((spec, 1) for spec in todo)
        active: list[_ShardWork] = []
        chunk_refs: dict[Any, _ShardWork] = {}
        write_refs: dict[Any, _ShardWork] = {}
        finished = 0
        progress.start()
        try:
            while pending or active:
                while pending and len(active) < s.max_shards_in_flight:
                    spec, attempt = pending.popleft()
                    chunks = shard_tasks.split_chunks(spec, s.images_per_call)
                    active.append(_ShardWork(spec, attempt, chunks))
                for work in active:
                    while work.next_chunk < len(work.chunks) and len(chunk_refs) < s.max_chunks_in_flight:
                        ref = self.submit_chunk(work, load, encode)
                        chunk_refs[ref] = work
                    if work.next_chunk == len(work.chunks) and work.write_ref is None:
                        tar = str(self.tar_path(work.spec))
                        work.write_ref = write.remote(work.spec, tar, *work.encoded)
                        work.encoded = []  # the write task holds them now
                        write_refs[work.write_ref] = work

                waitables = [*chunk_refs, *write_refs]
                ready, _ = ray.wait(waitables, num_returns=1, timeout=s.progress_interval_s)
                if ready:
                    ready, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0)
                for ref in ready:
                    if ref in chunk_refs:
                        del chunk_refs[ref]  # encoded (or failed: the shard's write task will say)
                        continue
                    work = write_refs.pop(ref)
                    active.remove(work)
                    retry = self.finish_shard(work, ref, progress)
                    if retry:
                        pending.appendleft((work.spec, work.attempt + 1))
                    else:
                        finished += 1
                        if self.hooks.stop_after(finished):
                            raise RunInterrupted(f"stopped by the caller's hooks after {finished} shard(s)")
                progress.heartbeat(len(active), len(chunk_refs))
            self.stream_seconds = time.monotonic() - progress.started
        except BaseException:
            self.stream_seconds = time.monotonic() - progress.started
            for ref in [*chunk_refs, *write_refs]:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 -- best effort; the refs are abandoned anyway
                    pass
            raise

    def submit_chunk(self, work: _ShardWork, load, encode):
        s, i = self.settings, work.next_chunk
        loaded = load.remote(work.spec.index, i, work.chunks[i], s.max_side, s.verify_pixel_md5)
        captions = self.pools["captioner"].call("caption", loaded)
        panoptic = self.pools["segmenter"].call("segment", loaded)
        matched = self.pools["matcher"].call("match", loaded, captions, panoptic)
        faces = self.pools["faces"].call("check", loaded, panoptic)
        encoded = encode.remote(loaded, captions, panoptic, matched, faces, self.models, s.jpeg_quality)
        work.encoded.append(encoded)
        work.next_chunk += 1
        return encoded

    def finish_shard(self, work: _ShardWork, ref, progress: ProgressReporter) -> bool:
        """Record a shard whose write task ended. Returns True when it should be tried again."""
        spec, seconds = work.spec, time.monotonic() - work.started
        try:
            written = ray.get(ref)
        except ray.exceptions.RayError as e:
            reason = root_cause(e)
            if isinstance(e, ray.exceptions.RayActorError) or "ActorDiedError" in reason:
                for pool in self.pools.values():
                    pool.heal()
            if work.attempt < self.settings.shard_attempts:
                self.retries += 1
                progress.retrying(spec.name, work.attempt, self.settings.shard_attempts, reason)
                return True
            entry = shard_entry.failed_entry(spec, self.tar_path(spec), reason, seconds, work.attempt, self.digest)
            self.shards_failed += 1
            tar = self.tar_path(spec)
            for stale in tar.parent.glob(f"{tar.name}{TMP_MARK}*"):  # a crashed attempt's partial tar
                stale.unlink(missing_ok=True)
        else:
            entry = shard_entry.done_entry(spec, self.tar_path(spec), written, seconds, work.attempt, self.digest)
            for k, v in (written.get("cpu_seconds") or {}).items():
                self.cpu_seconds[k] += v
            self.cpu_seconds["images"] += sum(1 for item in spec.items if item.duplicate_of is None)
        shard_entry.write_entry(self.request.run_dir, spec, entry)
        self.entries[spec.index] = entry
        self.shards_run += 1
        progress.shard_finished(entry)
        if self.on_shard_done is not None:
            self.on_shard_done(entry, self)
        return False

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
            replicas = len(totals)
            rates[name] = {
                "replicas": replicas,
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
        for pool in self.pools.values():  # already shut down when streaming had started; idempotent
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001 -- best effort, the run is failing anyway
                pass
        for folder in (req.shards_dir, req.run_dir / "shards", req.run_dir):
            remove_stale_temps(folder)
        counts: dict[str, Any] = {}
        if self.plan is not None:
            try:
                counts = account(self.plan, self.entries)
            except Exception:  # noqa: BLE001 -- the accounting itself may be what failed
                counts = {}
        seconds = time.monotonic() - self.t0
        summary = BuildSummary(
            req.run_dir, FAILED, counts, self.shards_run, 0, self.shards_failed, seconds, error=reason
        )
        self.write_failed_run_manifest(summary, "".join(traceback.format_exception(error)))
        for folder in (req.run_dir, req.shards_dir):
            remove_stale_temps(folder)
        self.say(f"failed: {reason}; finished shards are kept, the reason is in {req.run_dir / 'run.json'}")
        return summary

    def manifest_fields(self, source, n_shards: int | None, summary: BuildSummary) -> dict[str, Any]:
        """What ``run.json`` says of the run, whichever way it ended (``source`` None: it never opened)."""
        req = self.request
        return {
            "run": req.run_name,
            "status": summary.status,
            "source": {
                "path": str(Path(source.root if source is not None else req.source).resolve()),
                "type": getattr(source, "name", None), "limit": req.limit,
                "skipped_count": len(self.skipped), "skipped": self.skipped[:SKIPPED_KEPT],
            },
            "out": str(Path(req.out).resolve()),
            "shards_dir": str(req.shards_dir.resolve()),
            "run_dir": str(req.run_dir.resolve()),
            "profile": self.profile.name,
            "config": self.profile.to_dict(),
            "config_digest": self.digest,
            "models": self.models,
            "packages": package_versions(),
            "plan": {"shard_size": self.settings.shard_size, "shards": n_shards},
            "counts": summary.counts,
        }

    def write_failed_run_manifest(self, summary: BuildSummary, trace: str) -> None:
        req, source = self.request, self.source
        manifest = self.manifest_fields(source, len(self.plan) if self.plan is not None else None, summary)
        manifest["error"] = summary.error
        invocation = {
            "command_line": list(req.command_line),
            "status": FAILED,
            "error": summary.error,
            "traceback": trace,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_wall)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(summary.seconds, 3),
            "shards_run": summary.shards_run,
            "host": host_info(),
            "fault_drill": self.hooks.describe() or None,
        }
        write_run_manifest(req.run_dir, manifest, invocation)

    # ----------------------------------------------------------------------------- manifest
    def write_run_manifest(self, source, plan, summary: BuildSummary, started_wall: float, progress) -> None:
        req = self.request
        manifest = self.manifest_fields(source, len(plan), summary)
        invocation = {
            "command_line": list(req.command_line),
            "status": summary.status,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(summary.seconds, 3),
            "shards_run": summary.shards_run,
            "shards_skipped": summary.shards_skipped,
            "shards_failed": summary.shards_failed,
            "shard_retries": self.retries,
            "stream_seconds": round(self.stream_seconds, 3),
            "images_processed": progress.images_this_run,
            "images_per_second": round(progress.images_this_run / self.stream_seconds, 4) if self.stream_seconds else None,
            "stage_rates": self.stage_rates,
            "cpu_seconds_per_image": self.cpu_per_image(),
            "settings": asdict(self.settings),
            "ray": {"cluster_resources": ray.cluster_resources(), "actors": self.actor_info},
            "host": host_info(),
            "fault_drill": self.hooks.describe() or None,
        }
        write_run_manifest(req.run_dir, manifest, invocation)

    def say(self, message: str) -> None:
        print(f"[build] {message}", file=self.out, flush=True)


def run_build(
    request: BuildRequest,
    on_shard_done: Callable[[dict[str, Any], BuildJob], None] | None = None,
    out: TextIO | None = None,
) -> BuildSummary:
    """Run the dataset job on the connected Ray cluster; see the module docstring."""
    return BuildJob(request, on_shard_done, out).run()

"""Points where the caller of a build can act on it while it runs; the default does nothing.

The job calls :meth:`JobHooks.wrap_write_task` once, to get the function its shard-write tasks run,
and :meth:`JobHooks.stop_after` after every finished shard. Fault drills (``fixtures.failure_hooks``)
use these to crash a write task half-way or to stop a run early; a real run passes no hooks.
"""

from __future__ import annotations

from collections.abc import Callable


class JobHooks:
    def describe(self) -> str:
        """One line for the job's log and ``run.json`` when these hooks change what the job does."""
        return ""

    def wrap_write_task(self, write_task: Callable) -> Callable:
        """The function the shard-write tasks run (``write_task(spec, tar_path, *chunks)``); it must
        pickle, since Ray ships it to the workers."""
        return write_task

    def stop_after(self, finished_shards: int) -> bool:
        """True to stop the run now, as an interrupt would, once ``finished_shards`` are done."""
        return False

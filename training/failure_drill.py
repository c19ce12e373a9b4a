"""TESTING HOOK: kill one training worker once, to exercise Ray Train's restart-from-checkpoint.

Never set this in a real run. Switched on through the config's free-form ``extra`` section::

    extra: {kill_worker_at_step: 3, kill_rank: 1, kill_marker: /tmp/killed-once}

After finishing step ``kill_worker_at_step``, the worker of rank ``kill_rank`` ends its process with
``os._exit`` (a crash, as a lost node would look to Ray) — once: it first creates
``kill_marker``, and does nothing while that file exists. With ``max_failures >= 1`` Ray Train then
restarts the worker group, which resumes from the latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

KILL_EXIT_CODE = 87


def maybe_kill_worker(extra: dict, step: int, rank: int) -> None:
    at = extra.get("kill_worker_at_step")
    if at is None or step != int(at) or rank != int(extra.get("kill_rank", 0)):
        return
    marker = Path(extra["kill_marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"worker of rank {rank} killed after step {step}\n")
    sys.stdout.write(f"failure drill: killing the worker of rank {rank} after step {step}\n")
    sys.stdout.flush()
    os._exit(KILL_EXIT_CODE)

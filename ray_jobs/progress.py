"""Console progress of the dataset job: a line per finished shard, and a heartbeat while waiting.

    [build] 5/70 shards | subjects-00004 done: 998 written, 2 duplicate, 0 failed in 812.0s |
            4997/70000 images, 6.1 img/s, ETA 2:57:10 | failed so far: 3 images, 0 shards
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressReporter:
    def __init__(self, total_shards: int, total_images: int, interval_s: float = 30.0, out: TextIO | None = None):
        self.total_shards = total_shards
        self.total_images = total_images
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self.started = time.monotonic()
        self.last_line = self.started
        self.shards_done = 0  # finished (this run or before), done or failed
        self.images_done = 0
        self.images_this_run = 0
        self.failed_images = 0
        self.failed_shards = 0

    def start(self) -> None:
        """Start the clock for images/s and ETA (after the actors have loaded their models)."""
        self.started = self.last_line = time.monotonic()

    def already_done(self, entries: list[dict[str, Any]]) -> None:
        for e in entries:
            self.shards_done += 1
            self.images_done += len(e["samples"])
            self.failed_images += e["failed"]
        if entries:
            self.say(f"{len(entries)} shard(s) already done, skipped ({self.images_done} images)")

    def shard_finished(self, entry: dict[str, Any]) -> None:
        n = len(entry["samples"])
        self.shards_done += 1
        self.images_done += n
        self.images_this_run += n
        self.failed_images += entry["failed"]
        if entry["status"] == "done":
            what = (
                f"{entry['name']} done: {entry['written']} written, {entry['skipped']} duplicate, "
                f"{entry['failed']} failed in {entry['seconds']:.1f}s"
            )
        else:
            self.failed_shards += 1
            what = f"{entry['name']} FAILED after {entry['attempts']} attempt(s): {entry['error']}"
        self.say(f"{what} | {self.rates()}")

    def retrying(self, name: str, attempt: int, attempts: int, error: str) -> None:
        self.say(f"{name} attempt {attempt}/{attempts} failed, retrying: {error}")

    def heartbeat(self, in_flight: int, chunks_in_flight: int) -> None:
        if time.monotonic() - self.last_line >= self.interval_s:
            self.say(f"working: {in_flight} shard(s), {chunks_in_flight} chunk(s) in flight | {self.rates()}")

    def rates(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = self.images_this_run / elapsed
        left = self.total_images - self.images_done
        eta = format_duration(left / rate) if rate > 0 else "?"
        return (
            f"{self.images_done}/{self.total_images} images, {rate:.2f} img/s, ETA {eta} | "
            f"failed so far: {self.failed_images} images, {self.failed_shards} shards"
        )

    def say(self, message: str) -> None:
        self.last_line = time.monotonic()
        print(f"[build] {self.shards_done}/{self.total_shards} shards | {message}", file=self.out, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"

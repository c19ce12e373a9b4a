"""Console progress of the dataset job.

In a log (output is not a terminal): a line per finished shard, and a heartbeat while waiting::

    [build] 5/70 shards | subjects-00004 done: 998 written, 2 duplicate, 0 failed in 812.0s |
            4997/70000 images, 6.1 img/s, ETA 2:57:10 | failed so far: 3 images, 0 shards

On a terminal: one live tqdm bar (images done of all, images/s and ETA of this run, shards done,
failed images and shards); failed shards, retries and skipped shards are still printed as lines
above the bar, routine "shard done" lines are not.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressReporter:
    def __init__(
        self,
        total_shards: int,
        total_images: int,
        interval_s: float = 30.0,
        out: TextIO | None = None,
        tty: bool | None = None,
    ):
        """``tty``: draw a live bar (default: when ``out`` is a terminal)."""
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
        self.tty = _is_tty(self.out) if tty is None else bool(tty)
        self.bar = None

    def start(self) -> None:
        """Start the clock for images/s and ETA (after the actors have loaded their models)."""
        self.started = self.last_line = time.monotonic()
        if self.tty and self.bar is None:
            from tqdm import tqdm

            # initial: images done by earlier runs count towards the total, not towards the rate
            self.bar = tqdm(total=self.total_images, initial=self.images_done, unit="img", file=self.out,
                            desc="[build]", dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
            self._refresh_bar()

    def close(self) -> None:
        if self.bar is not None:
            self._refresh_bar()
            self.bar.close()
            self.bar = None

    def _refresh_bar(self) -> None:
        self.bar.set_postfix_str(
            f"shards {self.shards_done}/{self.total_shards}, failed {self.failed_images} img / "
            f"{self.failed_shards} shards", refresh=False)
        self.bar.refresh()

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
        if self.bar is not None:
            self.bar.update(n)
            self._refresh_bar()
            if entry["status"] == "done":
                return  # the bar shows it
        self.say(f"{what} | {self.rates()}")
        if self.bar is not None and self.shards_done >= self.total_shards:
            self.close()

    def retrying(self, name: str, attempt: int, attempts: int, error: str) -> None:
        self.say(f"{name} attempt {attempt}/{attempts} failed, retrying: {error}")

    def heartbeat(self, in_flight: int, chunks_in_flight: int) -> None:
        if self.bar is not None:
            self.bar.refresh()  # keeps the elapsed time and ETA moving while shards are open
            return
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
        line = f"[build] {self.shards_done}/{self.total_shards} shards | {message}"
        if self.bar is not None:
            self.bar.write(line, file=self.out)  # above the bar
        else:
            print(line, file=self.out, flush=True)


def _is_tty(out: TextIO) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"

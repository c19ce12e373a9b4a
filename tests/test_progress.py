"""Progress: per-shard lines in a log, a live tqdm bar on a terminal."""

from __future__ import annotations

import io
import re

from ray_jobs.progress import ProgressReporter


def entry(name: str, n: int = 4, failed: int = 0, status: str = "done") -> dict:
    return {"name": name, "samples": [{}] * n, "written": n - failed, "skipped": 0, "failed": failed,
            "seconds": 1.5, "status": status, "attempts": 3, "error": "boom"}


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_one_line_per_shard():
    out = io.StringIO()
    p = ProgressReporter(3, 12, interval_s=60, out=out)
    assert not p.tty
    p.start()
    p.shard_finished(entry("subjects-00000"))
    p.shard_finished(entry("subjects-00001", failed=1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("[build] 1/3 shards | subjects-00000 done: 4 written, 0 duplicate, 0 failed in 1.5s")
    assert "8/12 images" in lines[1] and "failed so far: 1 images, 0 shards" in lines[1]


def test_terminal_gets_a_live_bar_with_images_shards_rate_eta_and_failures():
    out = FakeTerminal()
    p = ProgressReporter(3, 12, interval_s=60, out=out)
    assert p.tty
    p.already_done([{"samples": [{}] * 4, "failed": 0}])  # an earlier run did shard 0
    p.start()
    p.shard_finished(entry("subjects-00001", failed=1))
    p.heartbeat(1, 1)
    text = out.getvalue()
    frames = [f for f in re.split(r"[\r\n]", text) if f.startswith("[build]:")]
    last = frames[-1]
    assert "8/12" in last and "img/s" in last and "shards 2/3" in last and "failed 1 img / 0 shards" in last
    assert re.search(r"<\d\d:\d\d", last) or "<?" in last  # tqdm's ETA field
    assert "subjects-00001 done" not in text  # routine shard lines give way to the bar
    p.shard_finished(entry("subjects-00002", status="failed"))  # a failed shard is still a line
    text = out.getvalue()
    assert "subjects-00002 FAILED after 3 attempt(s): boom" in text
    assert p.bar is None  # closed after the last shard
    assert "12/12" in text

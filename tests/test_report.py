"""The report: built from a finished run, opened in real headless Chromium over the DevTools protocol."""

import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from datagen.report.page import GALLERY_MAX, build_report, select_gallery, svg_value_counts
from tests.run_factory import make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-run")
    plan = [["w", "w", "f", "w", "w"], ["w", "d", "w", "w", "f", "w"], ["w", "w"]]
    expected = make_run(root, plan=plan, long_side=320, failed_shards=(2,))
    return expected, build_report(expected["run_dir"])


class DevToolsPage:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, user_data_dir, timeout=60.0):
        self.deadline = time.monotonic() + timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # move the pipe ends to fds 3 and 4 in the child, whatever their numbers were
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def _recv(self):
        while b"\0" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method, params=None, session=True):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and hasattr(self, "session"):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._recv()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, event):
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._recv())

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"]["value"]

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except (RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_report_opens_in_chromium_without_errors_and_every_image_loads(report, tmp_path):
    expected, path = report
    page = DevToolsPage(tmp_path / "chromium-profile")
    try:
        for domain in ("Runtime.enable", "Log.enable", "Page.enable", "Network.enable"):
            page.call(domain)
        page.call("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 1600, "deviceScaleFactor": 1,
                                                         "mobile": False})
        page.call("Page.navigate", {"url": path.resolve().as_uri()})
        page.wait_for("Page.loadEventFired")
        state = page.evaluate(
            "({total: document.images.length,"
            " ok: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,"
            " marked: document.body.getAttribute('data-images-loaded'),"
            " title: document.title, cards: document.querySelectorAll('.card').length})"
        )
        shot = page.call("Page.captureScreenshot", {"format": "png"})["data"]
        events = list(page.events)
    finally:
        page.close()

    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"]["type"] in ("error", "assert")]
    errors += [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"]["level"] == "error"]
    assert errors == []
    requested = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested

    n_written = len(expected["written"])
    assert state["cards"] == n_written  # a small run: every written sample is in the gallery
    assert state["total"] == n_written and state["ok"] == state["total"]
    assert state["marked"] == str(n_written)
    assert "test-run" in state["title"]

    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB"))
    assert image.shape[:2] == (1600, 1280)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200


def test_report_is_self_contained_and_shows_the_run(report):
    expected, path = report
    text = path.read_text(encoding="utf-8")
    # nothing fetched from anywhere: every src/href is a data: URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//", text)
    assert "<script src" not in text and "<link rel=\"stylesheet\"" not in text
    for key in expected["written"]:
        assert f'id="s{key}"' in text
    assert text.count("<img ") == len(expected["written"])
    # headline counts and the failure table
    assert re.search(r'<div class="n">13</div><div>source images</div><div class="dim">3 shard\(s\), 1 failed', text)
    assert re.search(r'<div class="n">8</div><div>written</div>', text)
    assert "<td>image</td><td>2</td>" in text and "<td>shard failed after # attempt(s)</td><td>2</td>" in text
    assert "run status incomplete · 3 of 3 planned shards have entries" in text
    # the weakest sample comes first in the gallery, with its phrase and score in the legend
    first = text.index('class="card"')
    assert text.index('id="s00004"', first - 200) == min(text.index(f'id="s{k}"') for k in expected["written"])
    assert "a man → person 0.240" in text
    assert "unmatched subject phrase" in text


def test_report_command_prints_the_report_path(report, capsys):
    expected, path = report
    assert main(["report", str(expected["run_dir"])]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == str(path)
    assert main(["report", str(expected["run_dir"] / "nowhere")]) == 1
    assert "not found" in capsys.readouterr().err


def test_gallery_budget_bounds_the_file(report):
    expected, _ = report
    small = build_report(expected["run_dir"], gallery_budget=30_000)
    text = small.read_text(encoding="utf-8")
    n = text.count("<img ")
    assert 0 < n < len(expected["written"])
    assert f"{len(expected['written']) - n} more left out to keep the file small" in text
    build_report(expected["run_dir"])  # leave the full report for the other tests


def _synthetic_rows(n, rng):
    rows = []
    for i in range(n):
        m = int(rng.integers(0, 6))
        scores = sorted(rng.uniform(0.05, 0.35, size=m).tolist())
        rows.append({
            "source_id": str(i), "key": f"{i:05d}", "shard": i // 1000, "status": "written",
            "n_matched": m, "min_match_score": scores[0] if m else None,
            "min_margin": float(rng.uniform(0, 0.1)) if m > 1 else None,
            "ambiguous_match": False, "unmatched_person_segment": bool(rng.random() < 0.1),
            "unmatched_subject_phrase": bool(rng.random() < 0.05), "no_person": bool(rng.random() < 0.02),
        })
        rows[-1]["ambiguous_match"] = rows[-1]["min_margin"] is not None and rows[-1]["min_margin"] < 0.01
    return rows


def test_gallery_selection_is_capped_at_70k_samples():
    rows = _synthetic_rows(70_000, np.random.default_rng(0))
    picks = select_gallery(rows, GALLERY_MAX)
    assert len(picks) == GALLERY_MAX and len({p.row["key"] for p in picks}) == GALLERY_MAX
    weakest = [p for p in picks if p.section == "Weakest matches"]
    assert len(weakest) == GALLERY_MAX // 2
    cutoff = max(p.row["min_match_score"] for p in weakest)
    assert sum(1 for r in rows if r["n_matched"] and r["min_match_score"] < cutoff) == len(weakest) - 1
    sections = {p.section for p in picks}
    assert {"Near ties (ambiguous matches)", "Flagged: no match", "Flagged: unmatched person segment",
            "Flagged: no person", "Flagged: unmatched subject phrase"} <= sections


def test_count_histograms_keep_the_long_tail_in_a_bounded_chart():
    counts = {str(k): (1000 // (k + 1)) for k in range(120)}
    svg = svg_value_counts(counts, "people", "people")
    assert svg.count("<rect") == 50  # 49 single values + one overflow bar
    assert "≥49" in svg
    assert f"≥49: {sum(1000 // (k + 1) for k in range(49, 120))}" in svg


def test_a_run_without_written_samples_still_gets_a_report(tmp_path):
    expected = make_run(tmp_path, plan=[["f", "f", "d"]])
    text = build_report(expected["run_dir"]).read_text(encoding="utf-8")
    assert "nothing to show: no written samples" in text
    assert re.search(r'<div class="n">2</div><div>failed</div>', text)
    assert "<img " not in text

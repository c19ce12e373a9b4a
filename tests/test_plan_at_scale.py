"""Planning a full-size FFHQ-wild source (70 000 items, ~255 MB of metadata) is fast and flat in
memory: the metadata is streamed, never loaded whole (issue 10: <= 15 s, driver peak RSS <= 1.5 GB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ffhq_metadata_factory import REAL_ITEMS, write_metadata

ROOT = Path(__file__).resolve().parent.parent

PLAN = """
import json, resource, sys, time
t, cpu = time.perf_counter(), time.process_time()
import collections
from datagen.shards.plan import plan_shards
from datagen.sources.readers import open_source

def peak_rss_mb():
    # VmHWM: this process image's own high-water mark (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
items = open_source(sys.argv[1]).items()
plan = plan_shards(items, 1000)
seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
print(json.dumps({
    "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak_rss_mb(),
    "items": len(items), "shards": len(plan), "test": sum(i.split == "test" for i in items),
    "duplicates": sum(i.duplicate_of is not None for i in items),
    "copy_groups": sum(n > 1 for n in collections.Counter(i.group for i in items).values()),
    "shard_7_first": plan[7].items[0].rel_path, "last_category": items[-1].meta["category"],
}))
sys.stdout.flush()
# yardstick, after the peak RSS was taken: reading the same file whole with the standard library
cpu = time.process_time()
with open(sys.argv[1] + "/ffhq-dataset-v2.json", "rb") as f:
    json.load(f)
print(json.dumps({"json_load_cpu_seconds": time.process_time() - cpu}))
"""


@pytest.fixture(scope="module")
def full_size_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ffhq-70k")
    write_metadata(root, REAL_ITEMS, duplicate_every=50)
    return root


@pytest.mark.scale
@pytest.mark.slow  # ~30 s on a quiet machine (writes and parses ~300 MB twice); 6 min on the shared box
def test_planning_70k_items_is_fast_and_flat(full_size_source):
    size_mb = (full_size_source / "ffhq-dataset-v2.json").stat().st_size / 1e6
    assert size_mb > 200  # the real file is 255 MB
    out = subprocess.run([sys.executable, "-c", PLAN, str(full_size_source)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    r, yardstick = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    print(f"\nplanning {REAL_ITEMS} items ({size_mb:.0f} MB metadata): {r['cpu_seconds']:.1f} s CPU "
          f"({r['seconds']:.1f} s wall), peak RSS {r['peak_rss_mb']:.0f} MB; json.load of the same file alone: "
          f"{yardstick['json_load_cpu_seconds']:.1f} s CPU")
    assert r["items"] == REAL_ITEMS and r["shards"] == 70
    assert r["shard_7_first"] == "in-the-wild-images/07000/07000.png"  # folders are the natural shards
    assert r["last_category"] == "validation"
    assert r["copy_groups"] == REAL_ITEMS // 50  # every 50th photo listed twice, found by its pixel md5
    assert r["duplicates"] == 0  # no image files here: a copy whose file is missing is loaded (and fails), not skipped
    assert r["test"] == 1000
    # Issue 10's bound is 15 s on a quiet machine. A shared test machine can be several times slower
    # (CPU time included), so the time is held against the old path's floor measured in the same
    # process: parsing the whole file with json.load, which planning used to do before anything else.
    assert r["cpu_seconds"] <= 1.5 * yardstick["json_load_cpu_seconds"]
    assert r["peak_rss_mb"] <= 1536

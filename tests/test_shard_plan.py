"""The shard plan: deterministic, complete, in source order, a function of source and size only."""

from __future__ import annotations

import random

import pytest

from datagen.shards.plan import ShardSpec, plan_shards
from datagen.sources.ffhq_wild import FFHQWildSource
from datagen.sources.items import SourceItem


def item(index: int) -> SourceItem:
    folder = index // 1000 * 1000
    return SourceItem(
        source_id=str(index),
        key=f"{index:05d}",
        path=f"/data/in-the-wild-images/{folder:05d}/{index:05d}.png",
        rel_path=f"in-the-wild-images/{folder:05d}/{index:05d}.png",
        group=f"g{index}",
        split="train",
        duplicate_of=None,
        meta={"index": index},
    )


def ids(plan: list[ShardSpec]) -> list[list[str]]:
    return [[i.source_id for i in shard.items] for shard in plan]


INDICES = [0, 1, 2, 5, 9, 10, 11, 999, 1000, 1003, 2500, 60000, 69999]


def test_every_item_exactly_once_in_source_order():
    items = [item(i) for i in INDICES]
    plan = plan_shards(items, 4)
    assert [s.index for s in plan] == [0, 1, 2, 3]
    assert [s.name for s in plan] == ["subjects-00000", "subjects-00001", "subjects-00002", "subjects-00003"]
    assert [len(s.items) for s in plan] == [4, 4, 4, 1]
    flat = [i.source_id for s in plan for i in s.items]
    assert flat == [str(i) for i in INDICES]
    assert ids(plan)[1] == ["9", "10", "11", "999"]


def test_membership_ignores_input_order_and_repeats():
    items = [item(i) for i in INDICES]
    expected = plan_shards(items, 3)
    for seed in range(5):
        shuffled = random.Random(seed).sample(items, len(items))
        again = plan_shards(shuffled, 3)
        assert again == expected
        assert ids(again) == ids(expected)
    assert plan_shards(items, 3) == expected  # pure: same answer every call
    assert [i.source_id for i in items] == [str(i) for i in INDICES]  # input untouched


def test_shard_size_edges():
    items = [item(i) for i in INDICES]
    assert ids(plan_shards(items, 1)) == [[str(i)] for i in INDICES]
    assert ids(plan_shards(items, len(items))) == [[str(i) for i in INDICES]]
    assert ids(plan_shards(items, 10_000)) == [[str(i) for i in INDICES]]
    assert plan_shards([], 5) == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None])
def test_bad_shard_size(bad):
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards([item(0)], bad)


def test_repeated_source_id_is_an_error():
    with pytest.raises(ValueError, match="share source_id '5'"):
        plan_shards([item(5), item(1), item(5)], 2)


def test_full_ffhq_shards_are_its_thousand_folders():
    items = [item(i) for i in range(3000)]
    plan = plan_shards(random.Random(0).sample(items, len(items)), 1000)
    assert len(plan) == 3
    for shard in plan:
        folders = {i.rel_path.split("/")[1] for i in shard.items}
        assert folders == {f"{shard.index * 1000:05d}"}


def test_plan_of_the_sample(sample_source):
    items = FFHQWildSource(sample_source).items()
    plan = plan_shards(items, 5)
    assert ids(plan) == [
        ["0", "1", "2", "3", "4"],
        ["1000", "1001", "1002", "1003", "1004"],
        ["2000", "60000"],
    ]
    # duplicates stay in the plan; the job records them rather than dropping them
    assert any(i.duplicate_of == "3" for i in plan[1].items)
    assert plan == plan_shards(FFHQWildSource(sample_source).items(), 5)

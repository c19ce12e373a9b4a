"""The shard plan: which source items go into which output shard.

The shard is the unit of work, failure and resume (DESIGN §1), so its membership must never
change between a run, a retry and a resume. :func:`plan_shards` is a pure function: it sorts the
items into source order (by numeric ``source_id``: the FFHQ index, or a folder's running index)
and cuts them into consecutive chunks of ``shard_size``; shard ``k`` holds items
``k*shard_size … (k+1)*shard_size - 1`` of that order. Membership and order are therefore a
function of the source's item set and the shard size only — not of the order the items were
passed in, the machine, or the time. Every item appears in exactly one shard, duplicates included
(the job records them as ``duplicate`` rather than annotating them twice).

With FFHQ-wild's 70 000 contiguous indices and ``shard_size=1000``, shard ``k`` is exactly the
folder ``in-the-wild-images/{k*1000:05d}/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from datagen.sources.items import SourceItem

SHARD_PREFIX = "subjects"


@dataclass(frozen=True)
class ShardSpec:
    index: int
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        return f"{SHARD_PREFIX}-{self.index:05d}"


def source_order(item: SourceItem) -> int:
    """The position of an item in its source: its numeric ``source_id``."""
    if not item.source_id.isdigit():
        raise ValueError(f"item {item.source_id!r} ({item.rel_path}): source_id is not a decimal index")
    return int(item.source_id)


def plan_shards(items: list[SourceItem], shard_size: int) -> list[ShardSpec]:
    """Cut the items, in source order, into consecutive shards of ``shard_size`` (last may be short)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    ordered = sorted(items, key=source_order)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if source_order(before) == source_order(after):
            raise ValueError(
                f"two items share source_id {before.source_id!r}: {before.rel_path} and {after.rel_path}"
            )
    return [
        ShardSpec(index=k, items=tuple(ordered[start : start + shard_size]))
        for k, start in enumerate(range(0, len(ordered), shard_size))
    ]

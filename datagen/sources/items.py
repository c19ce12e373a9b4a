"""What a source lists, whichever reader lists it (:mod:`datagen.sources.ffhq_wild`,
:mod:`datagen.sources.image_folder`, :mod:`datagen.sources.img2dataset`): :class:`SourceItem` (path, sample key, provenance, duplicate
group, split) and :class:`SourceError`, and how duplicates and the held-out split are assigned.

**Names** are recorded (``rel_path``, the record's provenance, the manifests) in the escaped form
of :mod:`datagen.sources.names`: unchanged for UTF-8 names, ``\\xNN`` for each byte that is not
UTF-8. ``path`` (what is opened) keeps the name as the OS gave it.

**Duplicates.** FFHQ-wild holds one in-the-wild copy of a photo per face extracted from it. Items
are grouped by ``in_the_wild.pixel_md5`` (falling back to ``file_md5``, then to the index alone
when the metadata has neither); folder items by the md5 of the file's bytes (exact copies only:
re-encoded copies are not detected at listing time; zero-byte and unreadable files each form their
own group so that each fails with its own reason). ``duplicate_of`` is the ``source_id`` of the
group's first item (lowest index) on every other member, ``None`` on the first. A member is a
duplicate only if its own file exists: a member whose file is missing is never recorded
``duplicate`` (it is loaded, and fails "file is missing"), and the group's first member whose file
exists is the one the others are duplicates of.

**Held-out split** (DESIGN §3 step 5). The test set has :func:`held_out_size` images: by default
``min(1000, n // 10)`` for ``n`` items, but at least 1 when ``n >= 2`` (and 0 for a single item),
or an explicit ``test_size`` (capped at ``n``). Whole duplicate groups are drawn, in the order of
``sha256("subject-ffhq/split/v1/" + group)``; a group is taken when it still fits in the remaining
room, so the test set has exactly the target size whenever group sizes allow it and never more.
The split therefore depends only on the set of groups and their sizes — not on listing order, not
on the machine — and duplicates can never straddle train and test.

"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from datagen import storage

DEFAULT_TEST_SIZE = 1000
TEST_FRACTION_DIVISOR = 10  # small sources hold out n // 10 images
SPLIT_SALT = "subject-ffhq/split/v1/"


class SourceError(ValueError):
    """A source cannot be listed (missing root, malformed metadata, …). One error, naming the
    file and everything found wrong with it."""


@dataclass(frozen=True)
class SourceItem:
    """One source image, known from metadata before decoding."""

    source_id: str  # FFHQ index "0".."69999" / folder: running index in sorted path order
    key: str  # sample key in shards: decimal digits (FFHQ: index zero-padded to 5)
    path: str  # absolute path of the image file
    rel_path: str  # path relative to the source root (POSIX separators)
    group: str  # duplicate group (metadata pixel md5, or file-content md5 for folders)
    split: str  # "train" | "test" (duplicates always share a split)
    duplicate_of: str | None  # source_id of the first item of its group, else None
    # provenance: source ("ffhq-wild" | "folder"), index, license, license_url, author, photo_url,
    # photo_title, face_rect, pixel_md5 (metadata's), file_md5, file_size, ...
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def held_out_size(n_items: int, test_size: int | None = None) -> int:
    """How many of ``n_items`` go to the test split (see module doc)."""
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    if test_size is not None:
        if test_size < 0:
            raise ValueError(f"test_size must be >= 0, got {test_size}")
        return min(test_size, n_items)
    if n_items < 2:
        return 0
    return min(DEFAULT_TEST_SIZE, max(1, n_items // TEST_FRACTION_DIVISOR))


def split_rank(group: str) -> str:
    """The order in which duplicate groups are drawn into the test split."""
    return hashlib.sha256((SPLIT_SALT + group).encode("utf-8")).hexdigest()


def choose_test_groups(group_sizes: dict[str, int], target: int) -> set[str]:
    """Whole groups, drawn in :func:`split_rank` order, that add up to at most ``target`` images."""
    chosen: set[str] = set()
    room = target
    for group in sorted(group_sizes, key=lambda g: (split_rank(g), g)):
        if room == 0:
            break
        size = group_sizes[group]
        if size <= room:
            chosen.add(group)
            room -= size
    return chosen


def assign_duplicates_and_split(items: list[SourceItem], test_size: int | None = None) -> list[SourceItem]:
    """Fill ``duplicate_of`` and ``split``; return the items in source order (numeric ``source_id``).

    The result does not depend on the order of ``items``: the first of a group is its lowest index.
    """
    items = sorted(items, key=lambda item: int(item.source_id))
    group_sizes: dict[str, int] = defaultdict(int)
    for item in items:
        group_sizes[item.group] += 1
    # Only members of groups with copies are looked at on disk (a stat each): a duplicate is never
    # recorded for a file that is not there, and the first copy that exists stands for the group.
    first_of_group: dict[str, str] = {}
    for item in items:
        if item.group not in first_of_group and (group_sizes[item.group] == 1 or storage.is_file(item.path)):
            first_of_group[item.group] = item.source_id
    test_groups = choose_test_groups(dict(group_sizes), held_out_size(len(items), test_size))
    out = []
    for item in items:
        first = first_of_group.get(item.group, item.source_id)
        if first != item.source_id and not storage.is_file(item.path):
            first = item.source_id  # missing: loaded, so it fails with its own reason
        out.append(
            replace(
                item,
                duplicate_of=None if first == item.source_id else first,
                split="test" if item.group in test_groups else "train",
            )
        )
    return out

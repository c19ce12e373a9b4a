"""The record's ``identity_faces`` (schema 1.2): every face the identity stage found in the image.

Each item: ``box`` ([x0, y0, x1, y1], pixels of the stored image), ``score`` (MTCNN's probability),
``size`` (the box's longer side, px), ``segment_id`` (the person segment holding it, ``null`` when
none: identities belong to people, not segments), ``embedded`` (whether it has an embedding in the
run's ``manifests/<run>/faces/<shard>.parquet``) and ``reason`` (why not, else ``null``). Faces are
numbered by their place in the list: face ``n`` of sample ``key`` is ``"<key>/<n>"`` everywhere
(face tables, ``identities.parquet``, ``pairs.parquet``). The face's identity is known only once the
run's faces are clustered (``subject-ffhq identities``): readers join it from ``identities.parquet``
(the exports through :func:`datagen.identity.index.identity_lookup`'s ``by_face``, read once per
process) and exported records carry it as ``identity``;
the tar's record, written before, says ``identity: null``.

**Identity checks.** A record joined with the run's index (``export --identities RUN``) also carries
``identity_checks``: ``merged_identities``, the person segments holding faces of two identities or
more according to the index (two different people in one mask: proof, where the face stage's
``merged_persons`` flag only counts faces; :func:`merged_segments`), and ``flags``
(``["merged_identities"]`` when there is one). The tar's record has no ``identity_checks`` key: the
index did not exist when it was written.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from datagen.stages.identity import face_id

IDENTITY_SINCE = "1.2"
OLDER_VERSIONS = ("1.0", "1.1")
IDENTITY_FLAG_NAMES = ("merged_identities",)


@dataclass
class ImageFace:
    box: list[float]  # [x0, y0, x1, y1], pixels of the stored image
    score: float  # MTCNN's face probability
    size: int  # the box's longer side, px
    segment_id: int | None  # the person segment holding it; None: in none
    embedded: bool  # an embedding is in the run's face table
    reason: str | None = None  # why it is not embedded
    identity: str | None = None  # filled by readers from identities.parquet

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageFace:
        return cls(**d)


@dataclass
class IdentityChecks:
    """What the run's identity index says about one record (module doc)."""

    merged_identities: list[int] = field(default_factory=list)  # person segments holding 2+ identities' faces
    flags: list[str] = field(default_factory=list)  # in IDENTITY_FLAG_NAMES order

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdentityChecks:
        return cls(**d)

    @classmethod
    def of(cls, merged_identities: list[int]) -> IdentityChecks:
        return cls(list(merged_identities), ["merged_identities"] if merged_identities else [])


def merged_segments(faces: Iterable[tuple[int | None, Any]]) -> list[int]:
    """The person segments holding faces of two identities or more, from ``(segment id, identity)``
    pairs (faces in no segment, or of no known identity, count for nothing)."""
    found: dict[int, set] = defaultdict(set)
    for segment_id, identity in faces:
        if segment_id is not None and identity is not None:
            found[segment_id].add(identity)
    return sorted(sid for sid, identities in found.items() if len(identities) >= 2)


def join_identities(key: str, faces: list[ImageFace] | None, identity_of: dict[str, int]) -> None:
    """Fill each embedded face's ``identity`` from ``{face id: identity}`` (``identities.parquet``)."""
    for n, f in enumerate(faces or []):
        found = identity_of.get(face_id(key, n))
        f.identity = str(found) if found is not None else None


def check_identity_checks(checks: IdentityChecks | None, version: str, persons: set[int], fail) -> None:
    """``identity_checks``: only from 1.2 on; merged segments are person segments; the flag is set
    exactly when there is one."""
    if checks is None:
        return
    if version in OLDER_VERSIONS:
        fail("identity_checks", f"is a schema {IDENTITY_SINCE} field; a {version} record has none")
    if not isinstance(checks.merged_identities, list) or any(s not in persons for s in checks.merged_identities):
        fail("identity_checks.merged_identities", f"must list person segment ids of the record, got "
                                                  f"{checks.merged_identities!r}")
    if checks.flags != (["merged_identities"] if checks.merged_identities else []):
        fail("identity_checks.flags", f"must be ['merged_identities'] exactly when merged_identities lists a "
                                      f"segment, got {checks.flags!r}")


def check_identity_faces(faces: list[ImageFace] | None, version: str, persons: set[int], fail) -> None:
    """The ``identity_faces`` field: only from 1.2 on; a list of well-formed faces in person segments."""
    if faces is None:
        return
    if version in OLDER_VERSIONS:
        fail("identity_faces", f"is a schema {IDENTITY_SINCE} field; a {version} record has none")
    if not isinstance(faces, list):
        fail("identity_faces", f"must be a list of faces, got {faces!r}")
    for j, f in enumerate(faces):
        p = f"identity_faces[{j}]"
        if not isinstance(f.box, list | tuple) or len(f.box) != 4 or not all(_number(v) for v in f.box) \
                or not (f.box[0] < f.box[2] and f.box[1] < f.box[3]):
            fail(f"{p}.box", f"must be four numbers [x0, y0, x1, y1] with x0 < x1, y0 < y1, got {f.box!r}")
        if not _number(f.score) or not 0 <= f.score <= 1:
            fail(f"{p}.score", f"must be a probability in 0..1, got {f.score!r}")
        if not isinstance(f.size, int) or isinstance(f.size, bool) or f.size < 0:
            fail(f"{p}.size", f"must be a non-negative integer (px), got {f.size!r}")
        if f.segment_id is not None and f.segment_id not in persons:
            fail(f"{p}.segment_id", f"names {f.segment_id!r}, which is not a person segment of the record")
        if not isinstance(f.embedded, bool) or (not f.embedded and not f.reason) or (f.embedded and f.reason):
            fail(f"{p}.embedded", f"is {f.embedded!r} with reason {f.reason!r}: a face not embedded says why, "
                                  "an embedded one gives no reason")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

"""The export formats, in one place: ``subject-ffhq export --format`` offers exactly these.

Adding a format: a module with a :class:`~datagen.export.common.ShardExport` subclass (its
``name``, its ``options``, how it writes one sample and how it ends), and one entry below.
"""

from __future__ import annotations

from pathlib import Path

from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.export.common import ExportError, ExportFilters, ExportSummary, ShardExport, run_export
from datagen.export.fastcomposer import FastComposerExport
from datagen.export.hf import HFExport
from datagen.export.identity_pairs import IdentityPairsExport
from datagen.export.seg_conditioning import SegConditioningExport
from datagen.export.subject_crops import SubjectCropsExport

FORMATS: dict[str, type[ShardExport]] = {
    f.name: f for f in (FastComposerExport, SegConditioningExport, SubjectCropsExport, HFExport, IdentityPairsExport)
}
DEFAULT_FORMAT = FastComposerExport.name


def export(
    fmt: str,
    shards_dir: str | Path,
    out: str | Path,
    filters: ExportFilters | None = None,
    *,
    overwrite: bool = False,
    workers: int = 1,
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
    **options,
) -> ExportSummary:
    """Export every ``subjects-*.tar`` of ``shards_dir`` to ``out`` as ``fmt``; return (and write) the
    summary. ``options``: the format's own (``FORMATS[fmt].options``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    return run_export(FORMATS[fmt](out, filters, object_types, **options), shards_dir, overwrite, workers)

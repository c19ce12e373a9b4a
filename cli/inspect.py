"""``subject-ffhq inspect RUN ID``: write a PNG showing one sample of a run.

The PNG shows the image with its segments overlaid and labelled (phrase, COCO label, score), the
caption with matched spans marked, the match table (CLIP, SBERT, score, margin per phrase) and the
phrase × segment score matrix. ``ID`` is a source id (FFHQ index) or a sample key. A run made with
random weights gets a red first line saying that its captions, segments and matches are meaningless.
"""

from __future__ import annotations

import io
from pathlib import Path

from cli.errors import fail
from datagen.files import atomic_write
from datagen.manifests.run_manifest import DEFAULT_MANIFESTS_ROOT, load_run_manifest, resolve_run_dir
from datagen.manifests.tables import ensure_tables, find_sample, random_weights, random_weights_note
from datagen.shards.reader import read_samples


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder, or a run name under --manifests-root")
    parser.add_argument("id", metavar="ID", help="source id (e.g. FFHQ index 42) or sample key (e.g. 00042)")
    parser.add_argument("--out", default=None, help="PNG to write, a path or URL (default: RUN/inspect/<key>.png)")
    parser.add_argument("--manifests-root", default=DEFAULT_MANIFESTS_ROOT, help="where run names are looked up")
    parser.add_argument("--shards", default=None,
                        help="folder holding the run's tars, if they moved since the run (default: the paths in its manifests)")


def inspect_sample(run_dir: Path, sample_id: str, out: Path | None = None, shards_dir: Path | None = None) -> Path:
    """Write the PNG of one written sample and return its path; KeyError/ValueError say why not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datagen import storage
    from datagen.manifests.tables import read_table
    from datagen.report.record_figure import sample_figure

    tables = ensure_tables(run_dir, shards_dir)
    row = find_sample(read_table(tables.samples), sample_id)
    if row["status"] != "written":
        raise ValueError(f"source {row['source_id']} (key {row['key']}) was not written: {row['status']}: {row['reason']}")
    shards = read_table(tables.shards).to_pylist()
    tar = next(storage.path(s["tar"]) for s in shards if s["shard"] == row["shard"])
    sample = read_samples(tar, [row["key"]])[row["key"]]
    title = (f"run {run_dir.name} · source {row['source_id']} · key {row['key']} · {row['shard_name']} · "
             f"{row['split']} · {sample.image.width}×{sample.image.height}")
    run = load_run_manifest(run_dir)
    warning = random_weights_note(run) if random_weights(run) else None
    fig = sample_figure(sample.image, sample.segment_map, sample.record, title=title, warning=warning)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out = out or run_dir / "inspect" / f"{row['key']}.png"
    return atomic_write(out, buf.getvalue())


def run(args) -> int:
    try:
        run_dir = resolve_run_dir(args.run, args.manifests_root)
        path = inspect_sample(run_dir, args.id, args.out, args.shards)
    except (KeyError, ValueError, OSError) as e:  # OSError: an unreadable tar, an unwritable --out
        return fail("inspect", e.args[0] if isinstance(e, KeyError) else e, code=1)
    print(path)
    return 0

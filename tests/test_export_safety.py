"""Export never reads, writes or removes anything outside OUT, and takes only ASCII decimal ids
unique as integers, refused before anything is written (issue 11, point 5): one test per attack."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from cli.main import main
from datagen.export.common import ExportError
from datagen.export.fastcomposer import export_fastcomposer
from tests.run_factory import make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export-safety-run"))


def _first_sample(run) -> dict[str, bytes]:
    tar_path = sorted(Path(run["shards_dir"]).glob("subjects-*.tar"))[0]
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if members and key != next(iter(members.values()))[0]:
                break
            members[ext] = (key, tar.extractfile(m).read())
    return {ext: data for ext, (_, data) in members.items()}


def write_shards(folder: Path, run, keys_per_shard: list[list[str]]) -> Path:
    """Shards whose samples are the run's first sample under the given keys (member names)."""
    folder.mkdir(parents=True)
    sample = _first_sample(run)
    for n, keys in enumerate(keys_per_shard):
        with tarfile.open(folder / f"subjects-{n:05d}.tar", "w") as tar:
            for key in keys:
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([["1"], ["00000001"]], "sample id '00000001' is the same integer (1) as id '1' in subjects-00000.tar"),
        ([["²"]], "member '².jpg' is not <id>.<ext> with an id of ASCII decimal digits 0-9"),
        ([["١٢٣"]], "member '١٢٣.jpg' is not <id>.<ext> with an id of ASCII decimal digits 0-9"),
        ([["00001", "../x"]], "member '../x.jpg' is not <id>.<ext>"),
    ],
)
def test_bad_ids_are_refused_before_anything_is_written(run, tmp_path, keys, message):
    shards = write_shards(tmp_path / "shards", run, keys)
    out = tmp_path / "fc"
    with pytest.raises(ExportError) as err:
        export_fastcomposer(shards, out)
    assert message in str(err.value)
    assert not out.exists()
    assert not (tmp_path / "x.jpg").exists()


def test_cli_says_one_line_for_a_bad_id(run, tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", run, [["²"]])
    assert main(["export", str(shards), str(tmp_path / "fc")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "ASCII decimal digits" in err


def test_cli_says_one_line_when_a_write_fails(run, tmp_path, capsys):
    """An OSError while writing (here: a folder where the summary goes) is an error line, exit 1, not a traceback."""
    out = tmp_path / "seg"
    (out / "export_summary.json" / "in-the-way").mkdir(parents=True)
    assert main(["export", "--format", "seg-conditioning", "--overwrite", str(run["shards_dir"]), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "export_summary.json" in err, err


def test_overwrite_never_reads_old_ids_as_paths_outside_out(run, tmp_path, capsys):
    out = tmp_path / "a" / "b" / "fc"
    export_fastcomposer(run["shards_dir"], out)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = []
    # what the unchecked code deleted: OUT/<id[:5]>/<id>.<ext> for these ids
    for line in ("../../victim", str(outside / "victim"), "00001/../../../../x", " 12\x00"):
        p = Path(os.path.normpath(out / line[:5] / f"{line}.jpg")) if "\x00" not in line else None
        if p is not None and not p.is_relative_to(out):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"precious")
            victims.append(p)
    with open(out / "image_ids.txt", "a") as f:
        f.write("../../victim\n" + str(outside / "victim") + "\n00001/../../../../x\n 12\x00\n")
    assert len(victims) == 3

    assert main(["export", "--overwrite", str(run["shards_dir"]), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ignored 4 line(s) of the old image_ids.txt that are not ids (never used as paths): '../../victim'" in printed
    assert all(v.read_bytes() == b"precious" for v in victims)


def test_overwrite_never_writes_through_a_symlinked_id_folder(run, tmp_path):
    out = tmp_path / "fc"
    export_fastcomposer(run["shards_dir"], out)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for p in (out / "00000").iterdir():
        p.unlink()
    (out / "00000").rmdir()
    (out / "00000").symlink_to(outside, target_is_directory=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(ExportError, match=r"00000 is a symbolic link .*refusing to write through it"):
        export_fastcomposer(run["shards_dir"], out, overwrite=True)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before  # nothing written


def test_subject_crops_never_write_through_a_symlinked_sample_folder(run, tmp_path):
    """``OUT/<key>`` of subject-crops gets the same check as FastComposer's ``OUT/<id[:5]>`` (common.py)."""
    from datagen.export.registry import export

    out = tmp_path / "crops"
    export("subject-crops", run["shards_dir"], out)
    key = sorted(p.name for p in out.iterdir() if p.is_dir())[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for p in (out / key).iterdir():
        p.unlink()
    (out / key).rmdir()
    (out / key).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ExportError, match=rf"{key} is a symbolic link .*refusing to write through it"):
        export("subject-crops", run["shards_dir"], out, overwrite=True)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_stale_removal_removes_links_not_their_targets(run, tmp_path):
    out = tmp_path / "fc"
    export_fastcomposer(run["shards_dir"], out)
    ids = (out / "image_ids.txt").read_text().split()
    stale = "00099"
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"precious")
    (out / stale[:5]).mkdir(exist_ok=True)
    (out / stale[:5] / f"{stale}.jpg").symlink_to(outside)
    (out / "image_ids.txt").write_text("\n".join([*ids, stale]) + "\n")
    summary = export_fastcomposer(run["shards_dir"], out, overwrite=True)
    assert not (out / stale[:5] / f"{stale}.jpg").is_symlink()
    assert outside.read_bytes() == b"precious" and summary.removed_stale == 1 and summary.ignored_old_ids == []


def test_identity_pairs_never_write_through_a_symlinked_sample_folder(identity_run, tmp_path):
    """``OUT/<key>`` of identity-pairs: the same check (common.sample_folder)."""
    from datagen.export.registry import export

    out, options = tmp_path / "pairs", {"references": identity_run["run"]}
    export("identity-pairs", identity_run["shards_dir"], out, **options)
    key = sorted(p.name for p in out.iterdir() if p.is_dir())[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for p in (out / key).iterdir():
        p.unlink()
    (out / key).rmdir()
    (out / key).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ExportError, match=rf"{key} is a symbolic link .*refusing to write through it"):
        export("identity-pairs", identity_run["shards_dir"], out, overwrite=True, **options)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]

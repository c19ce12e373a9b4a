"""The face checks after the shards: samples.parquet and summary.json, the report (rates, the faces
per person segment histogram, a gallery row per face flag) and the export filters with their counts.
The run is the run factory's, with hand-made face checks (tests.run_factory.FACES):

    key    image          face flags
    00000  astronaut      -
    00001  camera         small_face
    00002  grace_hopper   merged_persons, primary_face_unmatched
    00003  rocket         faceless_person, primary_face_unsegmented
    00004  coffee         - (no person, no face rect)
    00005  chelsea        - (no person, no face rect)
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cli.main import main
from datagen.export.common import ExportFilters
from datagen.export.fastcomposer import export_fastcomposer
from datagen.export.registry import export as export_as
from datagen.manifests.tables import write_manifest_tables
from datagen.record.schema import FACE_FLAG_NAMES
from datagen.report.gallery import FLAG_TITLES
from datagen.report.page import build_report
from tests.run_factory import make_run

FLAGS = {
    "00000": set(), "00001": {"small_face"}, "00002": {"merged_persons", "primary_face_unmatched"},
    "00003": {"faceless_person", "primary_face_unsegmented"}, "00004": set(), "00005": set(),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    expected = make_run(tmp_path_factory.mktemp("faces-run"), plan=[["w"] * 6], face_checks=True)
    write_manifest_tables(expected["run_dir"])
    return expected


def test_samples_table_and_summary_carry_the_face_checks(run):
    rows = {r["key"]: r for r in pq.read_table(run["run_dir"] / "samples.parquet").to_pylist()}
    for key, flags in FLAGS.items():
        assert {f for f in FACE_FLAG_NAMES if rows[key][f]} == flags, key
        assert rows[key]["faces_checked"] is True
    assert rows["00002"]["faces_per_person_segment"] == [2, 0] and rows["00002"]["n_faces"] == 2
    assert rows["00002"]["primary_face_label"] == "person" and rows["00002"]["primary_face_overlap"] == 1.0
    assert rows["00001"]["matched_face_sizes"] == [20] and rows["00001"]["min_matched_face_size"] == 20
    assert rows["00003"]["primary_face_segment"] is None and rows["00003"]["matched_face_sizes"] == []
    assert rows["00004"]["faces_per_person_segment"] == [] and rows["00004"]["primary_face_overlap"] is None

    summary = json.loads((run["run_dir"] / "summary.json").read_text())
    c = summary["counts"]
    assert (c["faces_checked"], c["with_face_rect"], c["faces"], c["face_flagged"]) == (6, 4, 4, 3)
    assert {f: c[f] for f in FACE_FLAG_NAMES} == {
        "merged_persons": 1, "faceless_person": 1, "small_face": 1, "primary_face_unsegmented": 1,
        "primary_face_unmatched": 1,
    }
    assert summary["per_person_segment"]["n_faces"] == {"0": 2, "1": 2, "2": 1}
    assert sum(summary["histograms"]["matched_face_size"]["counts"]) == 3  # astronaut 40, camera 20, grace 36


def test_records_without_face_checks_leave_the_face_columns_null(tmp_path):
    expected = make_run(tmp_path, plan=[["w", "w"]])
    write_manifest_tables(expected["run_dir"])
    for row in pq.read_table(expected["run_dir"] / "samples.parquet").to_pylist():
        assert row["faces_checked"] is False and row["n_faces"] is None
        assert row["faces_per_person_segment"] is None and all(row[f] is None for f in FACE_FLAG_NAMES)
    counts = json.loads((expected["run_dir"] / "summary.json").read_text())["counts"]
    assert counts["faces_checked"] == 0 and counts["face_flagged"] == 0


def test_report_shows_face_rates_histogram_and_a_gallery_row_per_face_flag(run):
    text = build_report(run["run_dir"]).read_text(encoding="utf-8")
    table = text[text.index('<table id="face-flags">'):]
    table = table[: table.index("</table>")]
    for f in FACE_FLAG_NAMES:
        assert f"<tr><td>{FLAG_TITLES[f]}</td><td>1</td><td>16.7%</td></tr>" in table, f
    assert "Faces per person segment" in text and "Face size of matched people" in text
    assert "Face checks ran on 6 of 6 written images (4 with a face rect from the source; faces found in person " \
           "segments: 4)" in text
    # a row per face flag, holding the sample that has it (a sample with two flags is in both rows)
    for f in FACE_FLAG_NAMES:
        heading = f"<h3>Face check: {FLAG_TITLES[f]} <span class=\"dim\">(1)</span></h3>"
        assert heading in text, heading
        row = text[text.index(heading) + len(heading):]
        row = row[: min(i for i in (row.find("<h3>"), row.find("</section>")) if i >= 0)]
        key = next(k for k, flags in FLAGS.items() if f in flags)
        assert f'id="s{key}"' in row, f
    assert "faces per person segment 1: 2, 2: 0" in text
    assert "face rect: segment 2 (person, unmatched), 100% of it" in text
    # the face rows come after the match rows
    assert text.index("Weakest matches") < text.index("Face check: ")


def test_export_face_filters_drop_and_count(run, tmp_path):
    def export(name, **filters):
        return export_fastcomposer(run["shards_dir"], tmp_path / name, ExportFilters(**filters))

    assert export("merged", drop_merged_persons=True).filtered_out == {"merged_persons": 1}
    assert export("faceless", drop_faceless_persons=True).filtered_out == {"faceless_person": 1}
    assert export("size", min_face_size=32).filtered_out == {"min_face_size": 1}  # camera's 20 px face
    assert export("size-36", min_face_size=37).filtered_out == {"min_face_size": 2}  # and grace_hopper's 36
    assert export("primary", require_primary_face=True).filtered_out == {"require_primary_face": 2}
    every = export("all", drop_merged_persons=True, drop_faceless_persons=True, min_face_size=32,
                   require_primary_face=True)
    # each sample counted under the first face filter it fails
    assert every.filtered_out == {"merged_persons": 1, "faceless_person": 1, "min_face_size": 1}
    assert every.exported == 3 and every.filters["drop_merged_persons"] is True
    ids = (tmp_path / "all" / "image_ids.txt").read_text().split()
    assert ids == ["00000", "00004", "00005"]
    exported = json.loads((tmp_path / "all" / "00000" / "00000.json").read_text())
    assert exported["segments"][0]["faces"][0]["size"] == 40 and exported["face_checks"]["flags"] == []
    # the other layouts take the same filters
    view = export_as("subject-crops", run["shards_dir"], tmp_path / "crops", ExportFilters(drop_merged_persons=True))
    assert view.filtered_out["merged_persons"] == 1  # (coffee and chelsea have no person to crop)


def test_shards_without_face_checks_cannot_pass_a_face_filter(tmp_path):
    old = make_run(tmp_path / "old", plan=[["w", "w", "w"]])
    summary = export_fastcomposer(old["shards_dir"], tmp_path / "fc", ExportFilters(min_face_size=10))
    assert summary.filtered_out == {"faces_not_checked": 3} and summary.exported == 0
    assert export_fastcomposer(old["shards_dir"], tmp_path / "fc2").exported == 3  # no face filter: all pass


def test_export_command_face_options(run, tmp_path, capsys):
    out = tmp_path / "fc"
    assert main(["export", str(run["shards_dir"]), str(out), "--drop-merged-persons", "--min-face-size", "32",
                 "--drop-faceless-persons", "--require-primary-face"]) == 0
    printed = capsys.readouterr().out
    assert "exported 3 of 6 samples" in printed
    assert 'filtered out: 3 {"faceless_person": 1, "merged_persons": 1, "min_face_size": 1}' in printed
    saved = json.loads((out / "export_summary.json").read_text())
    assert saved["filtered_out"] == {"faceless_person": 1, "merged_persons": 1, "min_face_size": 1}
    assert saved["filters"]["min_face_size"] == 32

import copy
import json

import pytest

from datagen.record.schema import SCHEMA_VERSION, Record, RecordError
from tests.record_factory import two_person_sample


def test_json_round_trip_is_exact():
    record, _ = two_person_sample()
    text = record.to_json()
    again = Record.from_json(text)
    assert again == record
    assert again.to_json() == text


def test_contract_fields_and_unmatched_segments_have_no_span_keys():
    record, _ = two_person_sample()
    d = json.loads(record.to_json())
    assert d["schema_version"] == SCHEMA_VERSION
    matched, unmatched = d["segments"]
    assert {"id", "coco_label", "bbox", "word", "start", "end"} <= matched.keys()
    assert d["caption"][matched["start"]:matched["end"]] == matched["word"] == "a woman"
    assert not {"word", "start", "end"} & unmatched.keys()  # FastComposer picks subjects with "end" in seg


def _mutated(path, value):
    record, _ = two_person_sample()
    d = json.loads(record.to_json())
    target = d
    *parents, last = path
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return d


@pytest.mark.parametrize(
    "path, value, field, words",
    [
        (["caption"], KeyError, "caption", "missing"),
        (["key"], "abc", "key", "decimal digits"),
        (["split"], "val", "split", "one of"),
        (["width"], 0, "width", "positive integer"),
        (["segments", 0, "bbox"], [2, 4, 10], "segments[0].bbox", "four integers"),
        (["segments", 1, "bbox"], [30, 10, 70, 40], "segments[1].bbox", "inside the 64x48 image"),
        (["segments", 0, "end"], 8, "segments[0].end", "reads 'a woman '"),
        (["segments", 1, "id"], 1, "segments[1].id", "duplicates segment id 1"),
        (["segments", 0, "id"], 0, "segments[0].id", "1..65535"),
        (["phrases", 1, "start"], 40, "phrases[1].start", "not inside the caption"),
        (["phrases", 2, "segment_id"], 9, "phrases[2].segment_id", "not in segments"),
        (["unmatched_person_segments"], [1], "unmatched_person_segments", "which is matched"),
        (["scores", "product"], [[0.5, 0.42]], "scores.product", "3x2 matrix"),
        (["provenance", "pixel_md5"], "abc", "provenance.pixel_md5", "32-character"),
        (["schema_version"], "0.1", "schema_version", "this code reads"),
    ],
)
def test_validation_names_the_field(path, value, field, words):
    d = _mutated(path, value)
    with pytest.raises(RecordError) as e:
        Record.from_dict(copy.deepcopy(d))
    assert f"field '{field}'" in str(e.value)
    assert words in str(e.value)
    assert "00042" in str(e.value) or field == "key"


def test_invalid_json_is_a_record_error():
    with pytest.raises(RecordError, match="not valid JSON"):
        Record.from_json("{not json")


def _face_checked():
    """The two-person sample with face checks: the matched woman has one face, the unmatched man two."""
    from datagen.record.build import face_flags
    from datagen.record.face_fields import FaceChecks, PrimaryFace, SegmentFace

    record, _ = two_person_sample()
    woman, man = record.segments
    woman.faces = [SegmentFace(box=[3.5, 5.0, 9.0, 11.2], score=0.998, size=6, inside=0.93)]
    man.faces = [SegmentFace(box=[31.0, 11.0, 39.0, 19.0], score=0.99, size=8, inside=1.0),
                 SegmentFace(box=[41.0, 11.0, 49.0, 19.0], score=0.95, size=8, inside=1.0)]
    record.face_checks = FaceChecks(small_face_px=7, primary_min_overlap=0.5,
                                    primary_face=PrimaryFace(rect=[30, 10, 40, 20], segment_id=2, overlap=1.0,
                                                             matched_person=False))
    record.face_checks.flags = face_flags(record.segments, record.face_checks)
    return record.validate()


def test_face_checks_round_trip_and_their_flags():
    record = _face_checked()
    assert record.face_checks.flags == ["merged_persons", "small_face", "primary_face_unmatched"]
    text = record.to_json()
    again = Record.from_json(text)
    assert again == record and again.to_json() == text
    d = json.loads(text)
    assert d["schema_version"] == SCHEMA_VERSION == "1.2"
    assert [len(s["faces"]) for s in d["segments"]] == [1, 2]
    assert d["face_checks"]["primary_face"] == {"rect": [30, 10, 40, 20], "segment_id": 2, "overlap": 1.0,
                                                "matched_person": False}
    # not face-checked (the face stage did not run): null, and no "faces" on any segment
    plain, _ = two_person_sample()
    d = json.loads(plain.to_json())
    assert d["face_checks"] is None and not any("faces" in s for s in d["segments"])


def test_a_schema_1_0_record_is_still_read_and_written_back_as_it_was():
    plain, _ = two_person_sample()
    d = json.loads(plain.to_json())
    d["schema_version"] = "1.0"
    del d["face_checks"], d["identity_faces"]  # what a 1.0 record looked like: no face fields at all
    old_text = json.dumps(d, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    old = Record.from_json(old_text)
    assert old.schema_version == "1.0" and old.face_checks is None
    assert old.to_json() == old_text
    # a 1.0 record never carries the 1.1 fields
    d["face_checks"] = json.loads(_face_checked().to_json())["face_checks"]
    with pytest.raises(RecordError, match="field 'face_checks' is a schema 1.1 field"):
        Record.from_dict(d)


@pytest.mark.parametrize(
    "path, value, field, words",
    [
        (["segments", 0, "faces", 0, "box"], [9, 5, 3, 11], "segments[0].faces[0].box", "x0 < x1"),
        (["segments", 0, "faces", 0, "score"], 1.5, "segments[0].faces[0].score", "0..1"),
        (["face_checks", "flags"], ["small_face", "merged_persons"], "face_checks.flags", "in that order"),
        (["face_checks", "flags"], ["blurry"], "face_checks.flags", "must list names"),
        (["face_checks", "primary_face", "segment_id"], 7, "face_checks.primary_face.segment_id", "not in segments"),
        (["face_checks", "primary_face", "matched_person"], True, "face_checks.primary_face.matched_person",
         "is not a matched person"),
        (["segments", 1, "faces"], None, "face_checks", "carry no 'faces'"),
    ],
)
def test_face_fields_are_validated_by_name(path, value, field, words):
    d = json.loads(_face_checked().to_json())
    target = d
    *parents, last = path
    for p in parents:
        target = target[p]
    target[last] = value
    with pytest.raises(RecordError) as e:
        Record.from_dict(d)
    assert f"field '{field}'" in str(e.value) and words in str(e.value)

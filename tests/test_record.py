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

"""Phrase-prompted grounding (``grounding: sam3``, issue 24), fast parts: the label mapping table,
the greedy instance assignment on hand-made scores, the segment map, the record it builds, the stage
rows a profile runs and the object types each grounding accepts."""

from __future__ import annotations

import numpy as np
import pytest

from datagen import stage_table
from datagen.config import ProfileError, load_profile, object_types_problem
from datagen.labels import head_concept, label_of, mapping_table
from datagen.record.build import build_record
from datagen.record.schema import Record
from datagen.sources.images import LoadedImage
from datagen.sources.items import SourceItem
from datagen.stages.grounding import GroundStep, Instance, assign_instances, ground_image
from datagen.stages.phrases import ChunkedCaption, NounPhrase

# phrase -> (head concept, coco_label, label_vocab): the docs' table (docs/grounding.md)
LABELS = [
    ("a man", "man", "person", "coco"),
    ("two women", "woman", "person", "coco"),
    ("a little girl", "girl", "person", "coco"),
    ("the children", "child", "person", "coco"),
    ("a dog", "dog", "dog", "coco"),
    ("a golden retriever puppy", "puppy", "dog", "coco"),
    ("a teddy bear", "teddy bear", "teddy bear", "coco"),
    ("a red surfboard", "surfboard", "surfboard", "coco"),
    ("an old sofa", "sofa", "couch", "coco"),
    ("the wall", "wall", "wall-other-merged", "coco"),
    ("the trees", "tree", "tree-merged", "coco"),
    ("a guitar", "guitar", "guitar", "open"),
    ("a violin", "violin", "violin", "open"),
    ("a surfboard's fin", "fin", "fin", "open"),
]


@pytest.mark.parametrize(("phrase", "concept", "label", "vocab"), LABELS)
def test_label_mapping_table(phrase, concept, label, vocab):
    assert head_concept(phrase) == concept
    assert label_of(concept) == (label, vocab)
    assert mapping_table([concept]) == [(concept, label, vocab)]


def chunked(caption: str, phrases: list[str]) -> ChunkedCaption:
    out, at = [], 0
    for p in phrases:
        start = caption.index(p, at)
        out.append(NounPhrase(p, start, start + len(p)))
        at = start + len(p)
    return ChunkedCaption(caption_raw=caption, caption=caption, phrases=out)


def loaded_image(shape) -> LoadedImage:
    from PIL import Image

    item = SourceItem(source_id="7", key="00007", path="/x/7.png", rel_path="7.png", group="g", split="train",
                      duplicate_of=None, meta={"source": "folder"})
    return LoadedImage(item, Image.new("RGB", (shape[1], shape[0])), "0" * 32, (shape[1], shape[0]))


def box_mask(shape, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


SHAPE = (40, 60)  # h, w
THRESHOLD = 0.5


def two_women_and_a_guitar():
    """ "two women" expanded, three woman candidates (0.6, 0.9, 0.8), a guitar only at 0.3 (< 0.5)."""
    cap = chunked("a woman and a woman with a guitar", ["a woman", "a woman", "a guitar"])
    instances = [
        Instance("woman", 0.6, box_mask(SHAPE, 0, 0, 10, 20)),
        Instance("woman", 0.9, box_mask(SHAPE, 20, 0, 30, 20)),
        Instance("woman", 0.8, box_mask(SHAPE, 40, 0, 50, 20)),
        Instance("guitar", 0.3, box_mask(SHAPE, 0, 30, 10, 40)),
    ]
    return cap, instances


def test_two_women_take_the_two_best_of_three_candidates_and_a_weak_phrase_stays_unmatched():
    cap, instances = two_women_and_a_guitar()
    concepts = [head_concept(p.text) for p in cap.phrases]
    # the greedy pick, in order: the best woman to the first phrase, the next best to the second
    assert assign_instances(concepts, instances, THRESHOLD) == [(0, 1), (1, 2)]
    assert assign_instances(concepts, instances, 0.0) == [(0, 1), (1, 2), (2, 3)]  # the guitar, once allowed

    g = ground_image(cap, instances, THRESHOLD, SHAPE)
    assert g.unmatched == [2]  # "a guitar": no instance at or above the threshold
    # ids: the matched instances in phrase order, then the others (by concept, best first)
    assert [(s.id, s.coco_label, s.score, s.label_vocab) for s in g.segments] == [
        (1, "person", 0.9, "coco"), (2, "person", 0.8, "coco"), (3, "guitar", 0.3, "open"), (4, "person", 0.6, "coco")]
    assert g.match.pairs == [(0, 1), (1, 2)]
    assert [s.bbox for s in g.segments] == [[20, 0, 30, 20], [40, 0, 50, 20], [0, 30, 10, 40], [0, 0, 10, 20]]
    np.testing.assert_allclose(g.match.product, [[0.9, 0.8, 0, 0.6], [0.9, 0.8, 0, 0.6], [0, 0, 0.3, 0]], rtol=1e-6)

    record = build_record(loaded_image(SHAPE), [], g, cap, g.match, {"sam3": "tiny"}).validate()
    d = Record.from_json(record.to_json()).to_dict()
    assert [(s["id"], s.get("word"), s.get("start"), s.get("match_score")) for s in d["segments"]] == [
        (1, "a woman", 0, 0.9), (2, "a woman", 12, 0.8), (3, None, None, None), (4, None, None, None)]
    assert d["unmatched_phrases"] == [2] and d["unmatched_person_segments"] == [4]
    assert d["segments"][2]["category_id"] is None and d["segments"][2]["label_vocab"] == "open"
    assert d["scores"]["clip"] == [] and d["scores"]["min_score"] == THRESHOLD


def test_an_instance_is_used_once_over_the_caption_and_smaller_masks_stay_on_top():
    cap = chunked("a man and a man", ["a man", "a man"])
    big = Instance("man", 0.95, box_mask(SHAPE, 0, 0, 60, 40))
    small = Instance("man", 0.7, box_mask(SHAPE, 10, 10, 20, 20))  # inside the big one
    g = ground_image(cap, [big], THRESHOLD, SHAPE)
    assert g.match.pairs == [(0, 1)] and g.unmatched == [1]  # one instance, not two phrases
    g = ground_image(cap, [big, small], THRESHOLD, SHAPE)
    assert g.match.pairs == [(0, 1), (1, 2)]
    assert (g.segment_map[10:20, 10:20] == 2).all() and g.segments[0].area == 60 * 40 - 100


def test_a_fully_covered_instance_is_dropped_and_its_phrase_unmatched():
    cap = chunked("a cat and a dog", ["a cat", "a dog"])
    same = box_mask(SHAPE, 0, 0, 10, 10)
    g = ground_image(cap, [Instance("cat", 0.9, same), Instance("dog", 0.8, same)], THRESHOLD, SHAPE)
    assert len(g.segments) == 1 and g.unmatched == [1]
    build_record(loaded_image(SHAPE), [], g, cap, g.match, {}).validate()


def test_the_grounding_picks_the_stage_rows(tiny_profile):
    panoptic = [(s.name, s.takes) for s in stage_table.stages_for(tiny_profile)]
    assert panoptic == [("captioner", ()), ("segmenter", ()), ("matcher", ("captioner", "segmenter")),
                        ("faces", ("segmenter",)), ("identity", ("segmenter",))]
    sam3 = load_profile("tiny-open-vocab")
    assert [(s.name, s.takes) for s in stage_table.stages_for(sam3)] == [
        ("captioner", ()), ("sam3", ("captioner",)), ("faces", ("sam3",)), ("identity", ("sam3",))]
    assert sum(s.gpu_share for s in stage_table.stages_for(sam3)) == pytest.approx(1.0)
    assert stage_table.model_ids(sam3)["sam3"].endswith("sam3")
    outputs = stage_table.outputs_by_stage(stage_table.stages_for(sam3), ([("c", [])], ["g"], ["f"], ["i"]))
    assert outputs["segmenter"] == ["g"] and outputs["matcher"] == ["g"]  # not a GroundingResult: passed through
    assert GroundStep.record_fields(None) == {"grounding": "sam3"}


def test_a_stage_taking_the_matcher_gets_the_matchers_shape_from_the_sam3_row():
    """A row that takes a stage another row provides gets that row's output converted by its step's
    ``provided``: a stage taking ``matcher`` sees ``(chunked caption, match)`` in a sam3 build too."""
    sam3 = load_profile("tiny-open-vocab")
    reader = stage_table.Stage("match_reader", "tests.plugin_stage:CaptionWordsStep", ("captioner",),
                               takes=("captioner", "matcher", "segmenter"))
    with stage_table.registered(reader):
        row = next(s for s in stage_table.stages_for(sam3) if s.name == "match_reader")
    assert row.takes == ("captioner", "sam3", "sam3")
    cap = chunked("a cat", ["a cat"])
    g = ground_image(cap, [Instance("cat", 0.9, box_mask(SHAPE, 0, 0, 10, 10))], THRESHOLD, SHAPE)
    captions, as_matcher, as_segmenter = row.inputs(([("a cat", [])], [g], [g]))
    assert captions == [("a cat", [])] and as_segmenter == [g]
    assert as_matcher == [(g.chunked, g.match)]


def test_object_types_take_open_labels_only_where_the_grounding_makes_them():
    assert load_profile("tiny-open-vocab", {"subjects": {"object_types": ["person", "guitar"]}}).subjects.object_types \
        == ("person", "guitar")
    with pytest.raises(ProfileError, match="'guitar', which is not a COCO panoptic label"):
        load_profile("tiny", {"subjects": {"object_types": ["person", "guitar"]}})
    with pytest.raises(ProfileError, match="did you mean 'person'"):  # a typo of a COCO label, even open
        load_profile("tiny-open-vocab", {"subjects": {"object_types": ["persn"]}})
    with pytest.raises(ProfileError, match="no label"):
        load_profile("tiny-open-vocab", {"subjects": {"object_types": ["Guitar!"]}})
    # against a run's own label set, where one is known
    assert "did you mean 'violin'" in object_types_problem(["violn"], known=["person", "violin"])
    with pytest.raises(ProfileError, match="sam3 is required with grounding: sam3"):
        load_profile("tiny", {"grounding": "sam3"})


def test_the_open_vocab_profile_fails_at_start_up_naming_sam3(monkeypatch, tmp_path):
    from datagen.stages.model_loading import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    profile = load_profile("open-vocab")
    assert profile.grounding == "sam3" and profile.captioner.model == load_profile("paper").captioner.model
    with pytest.raises(ModelNotFoundError, match=r"grounding model \(SAM 3\): model 'facebook/sam3'"):
        GroundStep.check_models(profile)

"""The trainer's data path: shards → loader → preprocessed examples → batches (tiny tokenizer, CPU)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from datagen.config import load_profile
from datagen.shards.writer import ShardWriter, encode_segment_map
from fixtures.training_shards import BLOCK_COLOURS, build_training_shards, training_records
from training.config import ConfigError, TrainConfig, expand_shards
from training.loader import make_dataset, make_loader
from training.preprocess import ExamplePreprocessor, SampleError
from training.subject_policy import SUBJECTS, TEXT_ONLY, UNCONDITIONAL, SubjectDropPolicy, subject_candidates
from training.subject_tokens import SubjectTokenizer
from training.target_transform import square_target

RESOLUTION = 64
NO_DROP = SubjectDropPolicy(uncond_prob=0.0, text_only_prob=0.0, keep_prob=1.0, max_subjects=4)


@pytest.fixture(scope="session")
def shards(sample_source, tmp_path_factory):
    return [str(p) for p in build_training_shards(sample_source, tmp_path_factory.mktemp("training-shards"))]


@pytest.fixture(scope="session")
def records(sample_source):
    return {r.key: (image, segment_map, r) for image, segment_map, r in training_records(sample_source)}


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model("stable-diffusion") / "tokenizer")


@pytest.fixture(scope="session")
def subject_size(tiny_model):
    from transformers import CLIPImageProcessor

    from training.image_encoder import processor_geometry

    return processor_geometry(CLIPImageProcessor.from_pretrained(tiny_model("clip-vision")))[0]


def preprocessor(tokenizer, subject_size, policy=NO_DROP, augment=True, seed=0, object_types=("person",)):
    import copy

    return ExamplePreprocessor(copy.deepcopy(tokenizer), subject_size, resolution=RESOLUTION, max_subjects=4,
                               object_types=object_types, policy=policy, augment_subjects=augment, seed=seed)


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def test_batch_shapes_and_dtypes(shards, tokenizer, subject_size):
    dataset = make_dataset(shards, preprocessor(tokenizer, subject_size), seed=0, shuffle_buffer=4)
    batch = next(iter(make_loader(dataset, batch_size=2, num_workers=0)))
    n, r, s = 4, RESOLUTION, subject_size
    expected = {
        "pixel_values": ((2, 3, r, r), torch.uint8),
        "input_ids": ((2, 77), torch.int64),
        "subject_pixel_values": ((2, n, 3, s, s), torch.uint8),
        "subject_masks": ((2, n, r, r), torch.bool),
        "subject_token_index": ((2, n), torch.int64),
        "subject_valid": ((2, n), torch.bool),
        "subject_ids": ((2, n), torch.int64),
        "num_subjects": ((2,), torch.int64),
    }
    for name, (shape, dtype) in expected.items():
        assert tuple(batch[name].shape) == shape, name
        assert batch[name].dtype == dtype, name
    assert len(batch["key"]) == 2 and len(batch["condition"]) == 2
    assert batch["pixel_values"].min() < batch["pixel_values"].max()  # an image, not a blank
    valid = batch["subject_valid"]
    assert torch.equal(valid.sum(1), batch["num_subjects"])
    assert (batch["num_subjects"] >= 1).all()  # no drops configured, every record has a person
    # valid slots: a non-empty mask, a real token, a crop; padding slots: all zero
    assert batch["subject_masks"][valid].flatten(1).any(1).all()
    assert (batch["subject_token_index"][valid] > 0).all()
    assert (batch["subject_pixel_values"][valid].flatten(1).amax(1) > 0).all()
    assert not batch["subject_masks"][~valid].any()
    assert (batch["subject_token_index"][~valid] == 0).all()
    assert (batch["subject_pixel_values"][~valid] == 0).all()
    # the caption tokens start with <|startoftext|> and contain <|endoftext|>
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert ((batch["input_ids"] == tokenizer.eos_token_id).any(1)).all()


def test_flagged_token_is_last_token_of_its_phrase(shards, records, tokenizer, subject_size):
    dataset = make_dataset(shards, preprocessor(tokenizer, subject_size, augment=False), seed=1, shuffle_buffer=1)
    stream = iter(dataset)
    seen_keys, checked = set(), 0
    for _ in range(2 * len(records)):
        example = next(stream)
        _, _, record = records[example["key"]]
        seen_keys.add(record.key)
        assert record.split == "train"  # the loader skips the test split
        ids = example["input_ids"].tolist()
        for slot in range(int(example["num_subjects"])):
            segment = next(s for s in record.segments if s.id == int(example["subject_ids"][slot]))
            assert segment.coco_label == "person"  # the flag ("banner") is never a subject
            phrase_tokens = tokenizer(segment.word, add_special_tokens=False).input_ids
            index = int(example["subject_token_index"][slot])
            assert ids[index] == phrase_tokens[-1], (record.caption, segment.word)
            assert ids[index - len(phrase_tokens) + 1 : index + 1] == phrase_tokens
            decoded = tokenizer.convert_ids_to_tokens(ids[index])
            assert decoded == tokenizer.convert_ids_to_tokens(phrase_tokens[-1])
            checked += 1
    assert "60000" not in seen_keys and {"00003", "90000"} <= seen_keys
    assert checked >= len(records)
    # "a man with a camera": the subject's token is the phrase's last token, "camera", not "man"
    example = preprocessor(tokenizer, subject_size, augment=False)(*_decoded(records["00001"]))
    index = int(example["subject_token_index"][0])
    assert tokenizer.convert_ids_to_tokens(int(example["input_ids"][index])) == "camera</w>"


def _decoded(entry):
    image, segment_map, record = entry
    return as_tensor(image), segment_map, record


def test_object_types_choose_the_subjects(records, tokenizer, subject_size):
    image, segment_map, record = _decoded(records["00000"])  # an astronaut and a flag
    only_people = preprocessor(tokenizer, subject_size, augment=False)(image, segment_map, record)
    with_banners = preprocessor(tokenizer, subject_size, augment=False, object_types=("person", "banner"))(
        image, segment_map, record)
    assert only_people["subject_ids"][:2].tolist() == [1, 0]
    assert sorted(with_banners["subject_ids"][:2].tolist()) == [1, 9]
    flag = int(with_banners["subject_token_index"][with_banners["subject_ids"].tolist().index(9)])
    assert tokenizer.convert_ids_to_tokens(int(with_banners["input_ids"][flag])) == "flag</w>"


@pytest.mark.parametrize("key", ["90000", "90001"])  # landscape (centre crop) and portrait (padded)
def test_masks_stay_over_their_pixels_after_resize_and_flip(records, tokenizer, subject_size, key):
    image, segment_map, record = _decoded(records[key])
    pre = preprocessor(tokenizer, subject_size, augment=False, seed=3)
    names = {s.id: s.word.split()[1] for s in record.segments}  # "a red person" -> red
    orientations = set()
    for _ in range(12):
        example = pre(image, segment_map, record)
        pixels = example["pixel_values"].float()  # (3, R, R), 0..255
        masks = example["subject_masks"]
        centres = {}
        for slot in range(int(example["num_subjects"])):
            colour = names[int(example["subject_ids"][slot])]
            inside = pixels[:, masks[slot]]
            assert inside.shape[1] > 0
            mean = inside.mean(dim=1)
            assert torch.allclose(mean, torch.tensor(BLOCK_COLOURS[colour], dtype=torch.float32), atol=25), (colour, mean)
            ys, xs = torch.nonzero(masks[slot], as_tuple=True)
            centres[colour] = (float(xs.float().mean()), float(ys.float().mean()))
        union = masks.any(0)
        outside = pixels[:, ~union]
        # and each mask covers its whole block: its colour hardly appears outside the masks
        for colour in centres:
            near = ((outside - torch.tensor(BLOCK_COLOURS[colour], dtype=torch.float32)[:, None]).abs().amax(0) < 40)
            assert near.float().mean() < 0.02, colour
        if key == "90000":
            # side by side, left to right in colour order; the square crop cuts the outer two away
            # (and the cap of 4 subjects may drop one more)
            assert set(centres) <= {"blue", "yellow", "magenta"} and len(centres) >= 2
            source_order = [c for c in ("blue", "yellow", "magenta") if c in centres]
            order = sorted(centres, key=lambda c: centres[c][0])
            assert order in (source_order, source_order[::-1])
            orientations.add(order == source_order)  # the flip swaps left and right
        else:  # stacked: a horizontal flip keeps red above blue
            assert centres["red"][1] < centres["blue"][1]
    if key == "90000":
        assert orientations == {True, False}  # both flips were drawn and checked


def test_square_target_resizes_map_with_nearest_and_pads_portraits():
    image = torch.zeros(3, 40, 20, dtype=torch.uint8)
    image[0, :, :10] = 255  # left half red
    segment_map = np.zeros((40, 20), dtype=np.uint16)
    segment_map[:, :10] = 7
    target, target_map = square_target(image, segment_map, 16, flip=False)
    assert target.shape == (3, 16, 16) and target_map.shape == (16, 16)
    assert set(np.unique(target_map).tolist()) == {0, 7}  # nearest: no blended ids
    assert (target_map[:, :4] == 0).all() and (target_map[:, 12:] == 0).all()  # black side padding
    assert (target_map[:, 4:8] == 7).all() and (target[0, :, 4:7] == 255).all()  # column 7 blends at the edge
    flipped, flipped_map = square_target(image, segment_map, 16, flip=True)
    assert (flipped_map[:, 8:12] == 7).all() and (flipped[0, :, 9:12] == 255).all()


def test_drop_policy_frequencies_match_configuration():
    policy = SubjectDropPolicy(uncond_prob=0.1, text_only_prob=0.1, keep_prob=0.9, max_subjects=4)
    rng = random.Random(0)
    draws = 20000
    counts = {UNCONDITIONAL: 0, TEXT_ONLY: 0, SUBJECTS: 0}
    kept_of_three = []
    sizes_of_six = []
    for i in range(draws):
        condition, kept = policy.draw(["a", "b", "c"] if i % 2 else list("abcdef"), rng)
        counts[condition] += 1
        if condition == SUBJECTS:
            (kept_of_three if i % 2 else sizes_of_six).append(len(kept))
            assert kept == sorted(kept)  # caption order kept
    assert abs(counts[UNCONDITIONAL] / draws - 0.1) < 0.01
    assert abs(counts[TEXT_ONLY] / draws - 0.1) < 0.01
    assert abs(np.mean(kept_of_three) / 3 - 0.9) < 0.01  # each subject kept with p = 0.9
    assert max(sizes_of_six) == 4  # never more than N
    # P(at least 4 of 6 kept) = 0.984: the cap takes a random subset of 4
    assert abs(np.mean(np.array(sizes_of_six) == 4) - 0.984) < 0.01


def test_preprocessor_draws_conditions_at_configured_rates(records, tokenizer, subject_size):
    policy = SubjectDropPolicy(uncond_prob=0.3, text_only_prob=0.2, keep_prob=0.9, max_subjects=4)
    pre = preprocessor(tokenizer, subject_size, policy=policy, augment=False, seed=5)
    image, segment_map, record = _decoded(records["90000"])  # five people
    empty = SubjectTokenizer(__import__("copy").deepcopy(tokenizer)).plain("")
    n = 300
    conditions = []
    for _ in range(n):
        example = pre(image, segment_map, record)
        conditions.append(example["condition"])
        if example["condition"] == UNCONDITIONAL:
            assert torch.equal(example["input_ids"], empty) and example["num_subjects"] == 0
        elif example["condition"] == TEXT_ONLY:
            assert not torch.equal(example["input_ids"], empty) and example["num_subjects"] == 0
        else:
            assert 1 <= example["num_subjects"] <= 4
    assert abs(conditions.count(UNCONDITIONAL) / n - 0.3) < 0.09
    assert abs(conditions.count(TEXT_ONLY) / n - 0.2) < 0.08


def test_long_caption_drops_subjects_beyond_the_context(tokenizer):
    import copy

    st = SubjectTokenizer(copy.deepcopy(tokenizer))
    caption = "a woman and " + "a very long description " * 20 + "and a man"
    ids, positions = st(caption, [len("a woman"), len(caption)])
    assert ids.shape == (77,) and int(ids[76]) == tokenizer.eos_token_id  # cut keeps the end token
    assert positions[1] is None
    assert tokenizer.convert_ids_to_tokens(int(ids[positions[0]])) == "woman</w>"


def test_subject_candidates_keep_matched_wanted_segments_in_caption_order(records):
    _, _, record = records["00003"]
    candidates = subject_candidates(record.segments, ("person",))
    assert [c.id for c in candidates] == [1, 2]
    assert [c.end for c in candidates] == sorted(c.end for c in candidates)


def test_bad_sample_raises_naming_shard_and_key_or_is_skipped_with_warn(records, tokenizer, subject_size, tmp_path, caplog):
    image, segment_map, record = records["00001"]
    path = tmp_path / "subjects-00000.tar"
    with ShardWriter(path) as writer:
        writer.write_encoded(record.key, b"not a jpeg", encode_segment_map(segment_map), record.to_json().encode())
        good = records["90001"]
        writer.write(*good)
    dataset = make_dataset([str(path)], preprocessor(tokenizer, subject_size), seed=0, shuffle_buffer=1)
    with pytest.raises(SampleError) as err:
        next(iter(dataset))
    assert "subjects-00000.tar" in str(err.value) and "00001" in str(err.value)
    dataset = make_dataset([str(path)], preprocessor(tokenizer, subject_size), seed=0, shuffle_buffer=1,
                           bad_samples="warn")
    with caplog.at_level(logging.WARNING, logger="training.loader"):
        example = next(iter(dataset))
    assert example["key"] == "90001"
    assert any("00001" in r.getMessage() and "subjects-00000.tar" in r.getMessage() for r in caplog.records)


def test_an_unreadable_split_file_stops_the_loader_even_with_warn(records, tokenizer, subject_size, tmp_path):
    """The split file is read once per loader process, not per sample: under ``bad_samples: warn`` it
    skipped every sample, forever (``functools.cache`` keeps no exception)."""
    path = tmp_path / "subjects-00000.tar"
    with ShardWriter(path) as writer:
        writer.write(*records["90001"])
    dataset = make_dataset([str(path)], preprocessor(tokenizer, subject_size), seed=0, shuffle_buffer=1,
                           bad_samples="warn", split_file=str(tmp_path / "nowhere.parquet"))
    with pytest.raises(FileNotFoundError, match="nowhere.parquet: no identity-safe split"):
        next(iter(dataset))


def test_the_loader_checks_samples_with_the_shard_readers_checks(records):
    from datagen.shards.reader import ShardError
    from datagen.shards.writer import encode_jpeg
    from training.loader import decode_training_sample

    image, segment_map, record = records["00001"]
    raw = {"__url__": "s/subjects-00007.tar", "__key__": record.key, "jpg": encode_jpeg(image),
           "seg.png": encode_segment_map(segment_map), "json": record.to_json().encode()}
    decoded, decoded_map, decoded_record = decode_training_sample(raw)
    assert tuple(decoded.shape) == (3, *segment_map.shape) and decoded_record == record
    assert decoded_map.dtype == np.uint16 and np.array_equal(decoded_map, segment_map)
    with pytest.raises(ShardError, match=f"subjects-00007.tar: member 00009.json holds record key '{record.key}'"):
        decode_training_sample({**raw, "__key__": "00009"})
    with pytest.raises(ShardError, match=f"subjects-00007.tar: sample {record.key}: image is .* but its segment map"):
        decode_training_sample({**raw, "seg.png": encode_segment_map(segment_map[:-1])})
    with pytest.raises(ShardError, match=r"lacks member\(s\) \['json'\]"):
        decode_training_sample({k: v for k, v in raw.items() if k != "json"})


def test_config_errors_name_the_setting(tmp_path):
    base = {"shards": ["a.tar"], "out": str(tmp_path), "pretrained": "p", "image_encoder": "e"}
    with pytest.raises(ConfigError, match="resolution"):
        TrainConfig(**base, resolution=100)
    with pytest.raises(ConfigError, match="uncond_prob"):
        TrainConfig(**base, uncond_prob=1.5)
    with pytest.raises(ConfigError, match="unknown trainer setting"):
        TrainConfig.from_dict({**base, "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match="lacks 'image_encoder'"):
        TrainConfig.from_profile(load_profile("paper", {"name": "x", "trainer": {"image_encoder": None}}),
                                 shards=["a.tar"], out="o")
    with pytest.raises(ConfigError, match="no shard file matches"):
        expand_shards([str(tmp_path / "nothing-*.tar")])
    assert TrainConfig.from_dict(TrainConfig(**base).to_dict()) == TrainConfig(**base)


def test_subject_crop_keeps_the_segment_and_noises_the_rest(records):
    from training.subject_crops import SubjectCropper

    image, segment_map, record = _decoded(records["00000"])
    person = next(s for s in record.segments if s.coco_label == "person")
    x0, y0, x1, y1 = person.bbox
    crop = SubjectCropper(224).crop(image, segment_map, person.id, person.bbox)
    assert tuple(crop.shape) == (3, y1 - y0, x1 - x0)
    inside = torch.from_numpy(segment_map[y0:y1, x0:x1] == person.id)
    assert torch.equal(crop[:, inside], image[:, y0:y1, x0:x1][:, inside])
    noise = crop[:, ~inside].float()
    assert abs(noise.mean().item() - 127.5) < 5 and noise.std().item() > 65  # uniform 0..255
    with pytest.raises(ValueError, match="no pixel"):
        SubjectCropper(224).plan(segment_map, 42, person.bbox)
    assert SubjectCropper(224, zoom=False).plan(segment_map, person.id, person.bbox) == list(person.bbox)


def test_crops_cut_on_the_device_are_the_loaders_crops(records, tokenizer, subject_size):
    """augment_subjects="device": the loader ships the image, the map and each crop's box (zoom-in
    drawn); cut_on_device makes the loader's crop from them. Pixels inside the segment are the same
    bytes; outside, both are uniform noise; the padding is black in both."""
    from training.collate import collate_examples
    from training.subject_crops import SubjectCropper, cut_on_device

    image, segment_map, record = _decoded(records["90000"])  # five people side by side
    keep_all = SubjectDropPolicy(0.0, 0.0, 1.0, 4)

    def preprocessor(place):
        return ExamplePreprocessor(__import__("copy").deepcopy(tokenizer), subject_size, resolution=RESOLUTION,
                                   policy=keep_all, augment_subjects=place, seed=3)

    on_device = preprocessor("device")(image, segment_map, record)
    assert "subject_pixel_values" not in on_device and on_device["source_image"] is image
    assert on_device["source_segment_map"].dtype == torch.uint8  # ids <= 255: compared and resized natively
    batch = collate_examples([on_device, on_device])
    assert isinstance(batch["source_image"], list) and batch["subject_boxes"].shape == (2, 4, 4)
    crops = cut_on_device(batch["source_image"], batch["source_segment_map"], batch["subject_boxes"],
                          batch["subject_ids"], batch["subject_valid"], subject_size, "cpu",
                          torch.Generator().manual_seed(0))
    valid = batch["subject_valid"]
    kept = int(valid[0].sum())
    assert crops.shape == (2, 4, 3, subject_size, subject_size) and kept >= 2
    assert (crops[~valid] == 0).all() and (crops[valid].flatten(1).amax(1) > 0).all()

    # where the segment covers its whole box there is no noise: the device's crop is the loader's, byte
    # for byte (same box, same padding, same resize)
    cropper = SubjectCropper(subject_size, zoom=False)
    for slot in range(kept):
        box, sid = batch["subject_boxes"][0, slot], int(batch["subject_ids"][0, slot])
        full = np.full(segment_map.shape, sid, dtype=np.uint8)
        want = cropper(image, full, sid, box.tolist())
        got = cut_on_device([image], torch.from_numpy(full)[None], box.view(1, 1, 4), torch.tensor([[sid]]),
                            torch.tensor([[True]]), subject_size, "cpu")
        assert torch.equal(got[0, 0], want)
    # noise statistics of a device crop of a segment that covers nothing but its corner pixel
    lone = torch.zeros(1, 64, 64, dtype=torch.int32)
    lone[0, 0, 0] = 9
    crop = cut_on_device([torch.full((3, 64, 64), 200, dtype=torch.uint8)], lone, torch.tensor([[[0, 0, 64, 64]]]),
                         torch.tensor([[9]]), torch.tensor([[True]]), 32, "cpu", torch.Generator().manual_seed(1))
    noise = crop[0, 0].float()
    assert abs(noise.mean().item() - 127.5) < 6 and 10 < noise.std().item() < 60  # resized uniform noise


def test_zoom_is_drawn_in_the_plan_and_keeps_the_top_square(records):
    from training.subject_crops import SubjectCropper

    image, segment_map, record = _decoded(records["00000"])
    person = next(s for s in record.segments if s.coco_label == "person")
    x0, y0, x1, y1 = person.bbox
    assert y1 - y0 > x1 - x0  # a portrait crop
    cropper = SubjectCropper(224, zoom=True, seed=0)
    boxes = [cropper.plan(segment_map, person.id, person.bbox) for _ in range(400)]
    zoomed = [b == [x0, y0, x1, y0 + (x1 - x0)] for b in boxes]
    assert all(z or b == list(person.bbox) for z, b in zip(zoomed, boxes, strict=True))
    assert 0.42 < np.mean(zoomed) < 0.58  # p = 0.5


def test_square_target_upstream_mode_blends_ids_of_portraits_and_nearest_never_invents_one():
    image = torch.zeros(3, 40, 20, dtype=torch.uint8)
    segment_map = np.zeros((40, 20), dtype=np.uint16)
    segment_map[:, :10] = 7
    _, ours = square_target(image, segment_map, 16, flip=False)
    _, upstream = square_target(image, segment_map, 16, flip=False, segment_map_resize="upstream")
    assert set(torch.unique(ours).tolist()) == {0, 7}
    # released: pad to 40x40, then a bilinear resize of image and map together -> ids 1..6 at the border
    assert set(torch.unique(upstream).tolist()) - {0, 7}
    landscape = np.zeros((20, 40), dtype=np.uint16)
    landscape[:, 20:] = 3
    _, upstream = square_target(torch.zeros(3, 20, 40, dtype=torch.uint8), landscape, 16, False, "upstream")
    assert set(torch.unique(upstream).tolist()) == {0, 3}  # landscape: only a centre crop, no blending


def test_drop_cropped_subjects_setting(records, tokenizer, subject_size):
    image, segment_map, record = _decoded(records["90000"])  # five people side by side; the crop cuts two away
    keep_all = SubjectDropPolicy(0.0, 0.0, 1.0, 4)
    for drop in (True, False):
        pre = ExamplePreprocessor(__import__("copy").deepcopy(tokenizer), subject_size, resolution=RESOLUTION,
                                  policy=keep_all, augment_subjects=False, seed=0, drop_cropped_subjects=drop)
        empty_masks = 0
        for _ in range(20):
            example = pre(image, segment_map, record)
            valid = example["subject_valid"]
            empty_masks += int((~example["subject_masks"][valid].flatten(1).any(1)).sum())
            if not drop:
                assert int(example["num_subjects"]) == 4  # 5 candidates, capped at 4, none dropped
        assert (empty_masks == 0) if drop else (empty_masks > 0)  # upstream keeps them with an empty mask


def test_zoom_in_keeps_the_top_square_of_portrait_crops_only():
    """Upstream: RandomApply(RandomZoomIn(1, 2), p=0.5) = upscale by z, keep the top square if
    taller than wide; PadToSquare and the resize to S then undo the upscale."""
    from training.subject_crops import SubjectCropper, zoom_in

    portrait = torch.arange(6, dtype=torch.uint8).view(1, 6, 1).expand(3, 6, 4).contiguous()  # row r has value r
    assert torch.equal(zoom_in(portrait), portrait[:, :4, :])  # rows 0-3: the top 4x4 square
    landscape = torch.arange(6, dtype=torch.uint8).view(1, 1, 6).expand(3, 4, 6).contiguous()
    assert torch.equal(zoom_in(landscape), landscape)
    square = torch.zeros(3, 5, 5, dtype=torch.uint8)
    assert zoom_in(square) is square

    # through the cropper, at S = 4: a zoomed portrait crop is its top square as is; an unzoomed one
    # is padded to 6x6 (one black column each side) and resized
    cropper = SubjectCropper(4, zoom=True, seed=0)
    every = np.ones((6, 4), dtype=np.int32)
    outcomes = [cropper(portrait, every, 1, cropper.plan(every, 1, [0, 0, 4, 6])) for _ in range(400)]
    zoomed = [torch.equal(o, portrait[:, :4, :]) for o in outcomes]
    assert 0.42 < np.mean(zoomed) < 0.58  # p = 0.5
    unzoomed = cropper.finish(portrait)
    assert all(z or torch.equal(o, unzoomed) for z, o in zip(zoomed, outcomes, strict=True))
    assert unzoomed[:, -1, 1:3].min() >= 4  # the whole height: its bottom holds rows 4-5, cut by the zoom
    assert (unzoomed[:, 1:, 0] < unzoomed[:, 1:, 1]).all()  # the black side padding darkens the edge
    wide = np.ones((4, 6), dtype=np.int32)
    assert all(torch.equal(cropper(landscape, wide, 1, cropper.plan(wide, 1, [0, 0, 6, 4])), cropper.finish(landscape))
               for _ in range(50))


def test_recipe_sets_the_text_only_probability(tmp_path, shards, tokenizer, subject_size):
    from cli.main import build_parser
    from cli.train import config_from_args

    base = {"shards": ["a.tar"], "out": str(tmp_path), "pretrained": "p", "image_encoder": "e"}
    assert TrainConfig(**base).recipe == "paper" and TrainConfig(**base).text_only_prob == 0.1  # the paper: 10%
    released = TrainConfig(**base, recipe="released")
    assert released.text_only_prob == 0.0  # run_training.sh passes no --text_only_prob: the dataset's default 0
    assert (released.uncond_prob, released.subject_keep_prob) == (0.1, 0.9)  # --uncondition_prob, --object_appear_prob
    assert TrainConfig(**base, recipe="released", text_only_prob=0.05).text_only_prob == 0.05  # given wins
    assert TrainConfig.from_dict(released.to_dict()) == released
    with pytest.raises(ConfigError, match="'recipe'"):
        TrainConfig(**base, recipe="mine")
    policy = ExamplePreprocessor.from_config(released, __import__("copy").deepcopy(tokenizer), subject_size).policy
    assert (policy.uncond_prob, policy.text_only_prob, policy.keep_prob, policy.max_subjects) == (0.1, 0.0, 0.9, 4)
    # the command line: generated from TrainConfig's fields, same option names as before
    args = build_parser(load="train").parse_args(["train", "--shards", shards[0], "--profile", "tiny", "--out", str(tmp_path),
                                      "--recipe", "released", "--workers", "2", "--gpu", "--batch-size", "3",
                                      "--mixed-precision", "fp32", "--lr", "2e-5"])
    cfg = config_from_args(args)
    assert (cfg.recipe, cfg.text_only_prob, cfg.num_workers, cfg.use_gpu, cfg.batch_size, cfg.mixed_precision,
            cfg.lr, cfg.gradient_checkpointing, cfg.steps) == ("released", 0.0, 2, True, 3, "fp32", 2e-5, False, 150000)
    with pytest.raises(SystemExit):
        build_parser(load="train").parse_args(["train", "--shards", "x", "--out", "o", "--recipe", "mine"])


def test_augmentation_place_follows_the_setting_and_the_device(tmp_path, tokenizer):
    import copy

    from training.subject_augment import SubjectAugmenter

    base = {"shards": ["a.tar"], "out": str(tmp_path), "pretrained": "p", "image_encoder": "e"}
    auto = TrainConfig(**base)
    assert (auto.subject_augmentation_place("cuda"), auto.subject_augmentation_place("cpu")) == ("device", "loader")
    assert TrainConfig(**base, augment_subjects_on="loader").subject_augmentation_place("cuda") == "loader"
    assert TrainConfig(**base, augment_subjects_on="device").subject_augmentation_place("cpu") == "device"
    assert TrainConfig(**base, augment_subjects=False).subject_augmentation_place("cuda") is None
    on_gpu = ExamplePreprocessor.from_config(auto, copy.deepcopy(tokenizer), 32, device_type="cuda")
    on_cpu = ExamplePreprocessor.from_config(auto, copy.deepcopy(tokenizer), 32, device_type="cpu")
    assert on_gpu.augmenter is None and on_gpu.cropper.zoom  # zoom-in needs the full-size crop: always here
    assert isinstance(on_cpu.augmenter, SubjectAugmenter) and on_cpu.cropper.zoom

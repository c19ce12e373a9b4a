"""One shard sample → one training example (DESIGN §6).

Steps, in order: keep the segments that carry a phrase and whose COCO label is a configured object
type; draw the condition (unconditional / text-only / subjects, each subject kept with p, at most
N); bring image and segment map to ``resolution``² jointly (:mod:`training.target_transform`)
and (``drop_cropped_subjects``, our default) drop subjects that the square crop cut away
entirely; cut each kept subject's background-noised, zoomed crop (:mod:`training.subject_crops`)
and, when augmenting in the loader, augment the example's crops together
(:mod:`training.subject_augment`); tokenize the caption and find each subject's last phrase
token (:mod:`training.subject_tokens`); pad the subject tensors to N.

Example fields (tensors unless noted; images stay uint8 until they reach the model, a quarter
of the bytes through loader workers' shared memory and host-to-device copies):

=========================  =====================  =============================================
``pixel_values``           uint8 (3, R, R)        target image (the model maps it to [-1, 1])
``input_ids``              int64 (77,)            caption tokens (empty caption if unconditional)
``subject_pixel_values``   uint8 (N, 3, S, S)     subject crops; zeros where no subject (absent
                                                  when ``augment_subjects="device"``: see below)
``subject_masks``          bool (N, R, R)         subject segments in the target; False padding
``subject_token_index``    int64 (N,)             index of each subject's token in input_ids (0 pad)
``subject_valid``          bool (N,)              which of the N slots hold a subject
``subject_ids``            int64 (N,)             each subject's segment id (0 pad)
``num_subjects``           int64 ()
``condition``              str                    unconditional | text_only | subjects
``key``                    str                    the sample key
=========================  =====================  =============================================

With ``augment_subjects="device"`` the crops are cut on the training device instead, from
``source_image`` (uint8 (3, H, W), the decoded image), ``source_segment_map`` ((H, W) ids) and
``subject_boxes`` (int64 (N, 4), each crop's box with its zoom-in drawn): the loader then does no
per-subject pixel work (the noise fill and resize of full-size crops were half of its time).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from datagen.config import DEFAULT_OBJECT_TYPES
from datagen.record.schema import Record
from training.references import REFERENCE_ID, CrossImageReferences
from training.subject_augment import SubjectAugmenter
from training.subject_crops import SubjectCropper
from training.subject_policy import UNCONDITIONAL, SubjectDropPolicy, subject_candidates
from training.subject_tokens import SubjectTokenizer
from training.target_transform import segment_id_tensor, square_target


class SampleError(ValueError):
    """A sample cannot be made into an example; the message names the shard, the key and why."""


class ExamplePreprocessor:
    def __init__(
        self,
        tokenizer,
        subject_size: int,
        resolution: int = 512,
        max_subjects: int = 4,
        object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES,
        policy: SubjectDropPolicy | None = None,
        augment_subjects: bool | str = True,
        seed: int | None = None,
        drop_cropped_subjects: bool = True,
        segment_map_resize: str = "nearest",
        references: CrossImageReferences | None = None,
    ):
        """``augment_subjects``: True or ``"loader"``: crops, zoom-in and augmentations here;
        ``"device"``: the zoom-in drawn here, the crops cut and augmented later on the batch
        (:func:`~training.subject_crops.cut_on_device`, :meth:`SubjectAugmenter.__call__`);
        False: crops here, neither zoom-in nor augmentations."""
        if augment_subjects not in (True, False, "loader", "device"):
            raise ValueError(f"augment_subjects must be True, False, 'loader' or 'device', got {augment_subjects!r}")
        self.subject_tokenizer = SubjectTokenizer(tokenizer)
        self.cropper = SubjectCropper(subject_size, zoom=bool(augment_subjects), seed=seed)
        self.augmenter = SubjectAugmenter() if augment_subjects in (True, "loader") else None
        self.cut_on_device = augment_subjects == "device"
        self.drop_cropped_subjects = drop_cropped_subjects
        self.segment_map_resize = segment_map_resize
        self.resolution = int(resolution)
        self.max_subjects = int(max_subjects)
        self.object_types = tuple(object_types)
        self.policy = policy or SubjectDropPolicy(max_subjects=max_subjects)
        if self.policy.max_subjects != self.max_subjects:
            raise ValueError(f"policy keeps up to {self.policy.max_subjects} subjects, preprocessor pads to {self.max_subjects}")
        self.rng = random.Random(seed)
        self.references = references  # cross-image crops (training.references); None: the subjects' own

    @classmethod
    def from_config(cls, cfg, tokenizer, subject_size: int, seed: int | None = None,
                    device_type: str = "cpu", references: CrossImageReferences | None = None) -> ExamplePreprocessor:
        """``device_type``: the training device's, which decides where crops are augmented
        (``cfg.subject_augmentation_place``)."""
        augment_on = cfg.subject_augmentation_place(device_type)
        policy = SubjectDropPolicy(cfg.uncond_prob, cfg.text_only_prob, cfg.subject_keep_prob, cfg.max_subjects)
        return cls(tokenizer, subject_size, cfg.resolution, cfg.max_subjects, cfg.object_types, policy,
                   augment_on or False, seed, cfg.drop_cropped_subjects, cfg.segment_map_resize, references)

    def reseed(self, seed: int) -> None:
        self.rng.seed(seed)
        self.cropper.reseed(seed)

    def __call__(self, image: torch.Tensor, segment_map: np.ndarray, record: Record) -> dict:
        """``image``: uint8 (3, H, W) at the record's size; ``segment_map``: (H, W) segment ids."""
        if tuple(image.shape[1:]) != (record.height, record.width) or segment_map.shape != (record.height, record.width):
            raise ValueError(
                f"image is {image.shape[2]}x{image.shape[1]}, segment map {segment_map.shape[1]}x{segment_map.shape[0]}, "
                f"record says {record.width}x{record.height}"
            )
        candidates = subject_candidates(record.segments, self.object_types)
        condition, subjects = self.policy.draw(candidates, self.rng)
        caption = "" if condition == UNCONDITIONAL else record.caption

        flip = self.rng.random() < 0.5
        ids = segment_id_tensor(segment_map)
        target, target_map = square_target(image, ids, self.resolution, flip, self.segment_map_resize)
        masks = {s.id: target_map == s.id for s in subjects}
        if self.drop_cropped_subjects:  # cropped out of the square target: cannot be localised, does not condition
            subjects = [s for s in subjects if masks[s.id].any()]

        input_ids, positions = self.subject_tokenizer(caption, [s.end for s in subjects])
        subjects = [s for s, p in zip(subjects, positions, strict=True) if p is not None]
        positions = [p for p in positions if p is not None]

        n, r, size = self.max_subjects, self.resolution, self.cropper.size
        subject_masks = torch.zeros(n, r, r, dtype=torch.bool)
        token_index = torch.zeros(n, dtype=torch.long)
        valid = torch.zeros(n, dtype=torch.bool)
        segment_ids = torch.zeros(n, dtype=torch.long)
        boxes = torch.zeros(n, 4, dtype=torch.long)
        for slot, (segment, position) in enumerate(zip(subjects, positions, strict=True)):
            boxes[slot] = torch.tensor(self.cropper.plan(segment_map, segment.id, segment.bbox))
            subject_masks[slot] = masks[segment.id]
            token_index[slot] = position
            valid[slot] = True
            segment_ids[slot] = segment.id
        example = {
            "pixel_values": target,
            "input_ids": input_ids,
            "subject_masks": subject_masks,
            "subject_token_index": token_index,
            "subject_valid": valid,
            "subject_ids": segment_ids,
            "num_subjects": torch.tensor(len(subjects), dtype=torch.long),
            "condition": condition,
            "key": record.key,
        }
        if self.references is not None:
            example.update(self.cross_image_crops(record.key, subjects))
        if self.cut_on_device:  # the training step cuts the crops (subject_crops.cut_on_device)
            example["subject_boxes"] = boxes
            example["source_image"] = image
            example["source_segment_map"] = ids
            return example
        subject_pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
        for slot, segment in enumerate(subjects):
            subject_pixels[slot] = self.cropper(image, segment_map, segment.id, boxes[slot].tolist())
        if self.references is not None:  # cross-image crops replace the subjects' own, before augmenting
            used = example["reference_used"]
            subject_pixels[used] = example.pop("reference_pixel_values")[used]
        if self.augmenter is not None and subjects:
            subject_pixels[: len(subjects)] = self.augmenter(subject_pixels[: len(subjects)])
        example["subject_pixel_values"] = subject_pixels
        return example

    def cross_image_crops(self, key: str, subjects: list) -> dict:
        """The example's cross-image crops (:mod:`training.references`): ``reference_pixel_values``
        uint8 (N, 3, S, S), ``reference_used`` bool (N,) (the slots whose crop comes from another
        photo), ``reference_keys`` (each used slot's photo, else ``""``) and ``reference_fallbacks``
        (subjects that asked for one and had none: they keep their own crop)."""
        n, size = self.max_subjects, self.cropper.size
        pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
        used = torch.zeros(n, dtype=torch.bool)
        keys, fallbacks = [""] * n, 0
        for slot, segment in enumerate(subjects):
            row = self.references.pick(key, segment.id, self.rng)
            if row is False:
                fallbacks += 1
            elif row is not None:
                image, segment_map, bbox = self.references.source(row)
                box = self.cropper.plan(segment_map, REFERENCE_ID, bbox)
                pixels[slot] = self.cropper(image, segment_map, REFERENCE_ID, box)
                used[slot], keys[slot] = True, self.references.keys[row]
        return {"reference_pixel_values": pixels, "reference_used": used, "reference_keys": keys,
                "reference_fallbacks": torch.tensor(fallbacks, dtype=torch.long)}

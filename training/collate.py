"""Examples → a batch: tensors stacked along a new first axis, strings gathered into lists."""

from __future__ import annotations

import torch

TENSOR_FIELDS = (
    "pixel_values",
    "input_ids",
    "subject_pixel_values",  # absent when the crops are cut on the training device
    "subject_boxes",  # present only then
    "subject_masks",
    "subject_token_index",
    "subject_valid",
    "subject_ids",
    "num_subjects",
    "reference_pixel_values",  # cross-image crops (training.references), cut in the loader: with the
    "reference_used",  # crops cut on the device, the step puts them in the slots reference_used marks
    "reference_fallbacks",
)
# Lists: strings, and the full-size images and segment maps the training device cuts crops from
# (their sizes differ; they stay on the host until cut_on_device moves each example's to the device).
LIST_FIELDS = ("condition", "key", "source_image", "source_segment_map", "reference_keys")


def collate_examples(examples: list[dict]) -> dict:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    fields = set(examples[0])
    batch: dict = {name: torch.stack([e[name] for e in examples]) for name in TENSOR_FIELDS if name in fields}
    for name in LIST_FIELDS:
        if name in fields:
            batch[name] = [e[name] for e in examples]
    return batch


def batch_to(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """The batch with its tensors moved to ``device`` (lists stay where they are)."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}

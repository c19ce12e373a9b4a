"""Examples → a batch: tensors stacked along a new first axis, strings gathered into lists."""

from __future__ import annotations

import torch

TENSOR_FIELDS = (
    "pixel_values",
    "input_ids",
    "subject_pixel_values",
    "subject_masks",
    "subject_token_index",
    "subject_valid",
    "subject_ids",
    "num_subjects",
)
LIST_FIELDS = ("condition", "key")


def collate_examples(examples: list[dict]) -> dict:
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    batch: dict = {name: torch.stack([e[name] for e in examples]) for name in TENSOR_FIELDS}
    for name in LIST_FIELDS:
        batch[name] = [e[name] for e in examples]
    return batch


def batch_to(batch: dict, device: torch.device | str, non_blocking: bool = False) -> dict:
    """The batch with its tensors moved to ``device``."""
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}

"""SAM 3 over images and concepts: every instance of each concept, with its score and mask.

``Sam3Grounder`` loads the model named in the profile's ``sam3`` section (a hub id such as
``facebook/sam3`` or a folder such as the tiny model) through
:func:`~datagen.stages.model_loading.load_pretrained` and runs transformers' ``Sam3Model`` +
``Sam3Processor.post_process_instance_segmentation``.

``instances(images, concepts)``: ``concepts[i]`` are image ``i``'s phrase concepts (repeats allowed);
each distinct concept of an image is one prompt. Per group of ``batch_size`` images:

* the images go through the vision encoder **once** (``get_vision_features``), and the group's
  distinct concepts through the text encoder once (``get_text_features``);
* the (image, concept) prompts then run ``batch_size`` at a time through the DETR encoder/decoder
  and the mask decoder, each taking its image's vision embeddings and its concept's text embeddings
  by index (``forward(vision_embeds=..., text_embeds=...)``): SAM 3 takes one text prompt per image
  per forward, so an image with four concepts is four rows of one batch, sharing one vision pass;
* ``post_process_instance_segmentation`` keeps the queries scoring more than ``threshold`` (query
  score x presence score), with masks resized to the stored image and binarised at
  ``mask_threshold``; the ``max_instances`` best of each prompt are kept.

The processor resizes every image to the model's square input, so an image's instances never depend
on which other images share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from datagen.config import Sam3Settings
from datagen.stages.model_loading import load_pretrained, pick_device

WHAT = "grounding model (SAM 3)"


@dataclass
class Instance:
    """One SAM 3 instance of a concept: its mask at the stored image's size and its score."""

    concept: str
    score: float
    mask: np.ndarray  # bool, H x W


class Sam3Grounder:
    """``instances(images, concepts) -> list[list[Instance]]`` (module doc)."""

    def __init__(self, section: Sam3Settings, device: str | None = None):
        from transformers import Sam3Model, Sam3Processor

        self.section = section
        self.device = pick_device(device or section.device)
        self.processor, self.model, self.dtype = load_pretrained(
            section.model, WHAT, Sam3Processor, Sam3Model, self.device, section.dtype)
        self.forwards = 0  # prompt batches run (vision passes are one per image group)

    def instances(self, images: Sequence, concepts: Sequence[Sequence[str]]) -> list[list[Instance]]:
        if len(images) != len(concepts):
            raise ValueError(f"sam3: {len(images)} images but {len(concepts)} concept lists; they must pair up")
        out: list[list[Instance]] = []
        step = self.section.batch_size
        for start in range(0, len(images), step):
            out.extend(self._group(list(images[start:start + step]), list(concepts[start:start + step])))
        return out

    def _group(self, images: list, concepts: list[Sequence[str]]) -> list[list[Instance]]:
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        prompts = [(i, c) for i, cs in enumerate(concepts) for c in dict.fromkeys(cs)]  # distinct, in order
        found: list[list[Instance]] = [[] for _ in images]
        if not prompts:
            return found
        texts = sorted({c for _, c in prompts})
        with torch.inference_mode():
            pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            vision = self.model.get_vision_features(pixel_values=pixels)
            tokens = self.processor(text=texts, return_tensors="pt").to(self.device)
            text = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            step = self.section.batch_size
            for start in range(0, len(prompts), step):
                batch = prompts[start:start + step]
                img = torch.tensor([i for i, _ in batch], device=self.device)
                txt = torch.tensor([texts.index(c) for _, c in batch], device=self.device)
                out = self.model(
                    vision_embeds=Sam3VisionEncoderOutput(
                        fpn_hidden_states=tuple(t[img] for t in vision.fpn_hidden_states),
                        fpn_position_encoding=tuple(t[img] for t in vision.fpn_position_encoding)),
                    text_embeds=BaseModelOutputWithPooling(pooler_output=text.pooler_output[txt]),
                    attention_mask=tokens["attention_mask"][txt],
                )
                self.forwards += 1
                post = self.processor.post_process_instance_segmentation(
                    _float(out), threshold=self.section.threshold, mask_threshold=self.section.mask_threshold,
                    target_sizes=[(rgb[i].height, rgb[i].width) for i, _ in batch])
                for (i, concept), result in zip(batch, post, strict=True):
                    found[i].extend(self._kept(concept, result))
        return found

    def _kept(self, concept: str, result: dict) -> list[Instance]:
        scores = result["scores"].float().cpu().numpy()
        masks = result["masks"].bool().cpu().numpy()
        best = np.argsort(-scores, kind="stable")[: self.section.max_instances]
        return [Instance(concept, float(scores[k]), masks[k]) for k in best if masks[k].any()]


def _float(out):
    """The outputs post-processing reads, in fp32 (a bf16 model's logits otherwise lose the ranking)."""
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence_logits"):
        value = getattr(out, name, None)
        if value is not None:
            setattr(out, name, value.float())
    return out

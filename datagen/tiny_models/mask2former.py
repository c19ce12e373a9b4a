"""A tiny, randomly initialised Mask2Former for COCO panoptic, in the real on-disk format.

Same classes and files as ``facebook/mask2former-swin-large-coco-panoptic``
(``Mask2FormerForUniversalSegmentation`` with a Swin backbone + ``Mask2FormerImageProcessor``) and
the same label map: COCO panoptic's 133 classes, the 80 "things" first (ids 0–79) then the 53
"stuff" classes (ids 80–132), under the names detectron2 and the Hugging Face checkpoints use.
Everything else is small: a 4-stage Swin with 16–128 channels and one block per stage, a 1-layer
pixel decoder, 3 masked-attention decoder layers and 20 queries (about 1.5 MB). Random weights
(fixed seed): segments are meaningless, but their plumbing is real.

At the default init a random model is unsure of everything (class scores ≈ 1/134, mask logits ≈ 0)
and ``post_process_panoptic_segmentation`` keeps no segment at any threshold, because it compares
``score × mask probability`` with ``mask_threshold``. The two output heads (class predictor, last
layer of the mask embedder) are therefore scaled by :data:`HEAD_SCALE` after the seeded init, so the
random queries are confident and their masks crisp: with the tiny profile's thresholds
(``threshold`` 0.0, ``mask_threshold`` 0.5, ``overlap_mask_area_threshold`` 0.0) a photo gets a
handful of segments of both things and stuff.
"""

from __future__ import annotations

from pathlib import Path

SEED = 0
IMAGE_SIZE = 64
HEAD_SCALE = 50.0
MASK_EMBEDDER_LAST = "model.transformer_module.decoder.mask_predictor.mask_embedder.2.0"

# COCO panoptic (detectron2's COCO_CATEGORIES order; the ``id2label`` of the HF checkpoints).
COCO_PANOPTIC_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_PANOPTIC_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood",
    "flower", "fruit", "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform",
    "playingfield", "railroad", "river", "road", "roof", "sand", "sea", "shelf", "snow", "stairs",
    "tent", "towel", "wall-brick", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "window-blind", "window-other", "tree-merged", "fence-merged", "ceiling-merged",
    "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
    "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged",
    "building-other-merged", "rock-merged", "wall-other-merged", "rug-merged",
)
COCO_PANOPTIC_LABELS = COCO_PANOPTIC_THINGS + COCO_PANOPTIC_STUFF
assert len(COCO_PANOPTIC_THINGS) == 80 and len(COCO_PANOPTIC_STUFF) == 53


def build_mask2former(dest: Path) -> None:
    """Write a tiny COCO-panoptic Mask2Former (model + image processor) into ``dest``."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    dest = Path(dest)
    backbone = SwinConfig(
        image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
        window_size=4, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    id2label = dict(enumerate(COCO_PANOPTIC_LABELS))
    config = Mask2FormerConfig(
        backbone_config=backbone.to_dict(),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=1, decoder_layers=4, num_attention_heads=2, dim_feedforward=64,
        num_queries=20, id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        model.class_predictor.weight.mul_(HEAD_SCALE)
        model.get_submodule(MASK_EMBEDDER_LAST).weight.mul_(HEAD_SCALE)
    processor = Mask2FormerImageProcessor(
        size={"shortest_edge": IMAGE_SIZE, "longest_edge": 4 * IMAGE_SIZE}, size_divisor=32,
        ignore_index=255, num_labels=len(COCO_PANOPTIC_LABELS),
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)

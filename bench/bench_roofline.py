"""Roofline per stage: the per-image lower bound of each ``paper`` stage on an H100 and an A100.

RANDOM WEIGHTS / NO WEIGHTS: the models are the paper-size architectures of
``fixtures/tiny_models/paper_size`` built on PyTorch's ``meta`` device (shapes only, no memory, no
arithmetic), so this runs in about a minute on a 2-core CPU; only MTCNN (small, real weights inside
facenet-pytorch) runs for real on one photo.

For each stage, at the profile's settings:

* **FLOPs per image**, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the forward passes
  the stage runs (matmuls, convolutions, attention: what the counter knows; element-wise work is not
  counted): the captioner's vision encoder + Q-Former and **every decode step** (prefill, then one
  token at a time against the KV cache up to ``max_new_tokens``); the segmenter on its square canvas;
  ViT-H-14 on the segment crops and the phrases; SBERT on the phrases; MTCNN on a 1024 px photo; the
  trainer's forward (VAE encoder, text encoder, vision encoder on the subject crops, U-Net) and its
  backward (counted too: ``.backward()`` on meta tensors).
* **Bytes moved per image**: the weights each forward reads (bf16: 2 bytes a parameter) divided by
  the images sharing that forward (the batch), plus the KV cache each decode step reads; for the
  trainer also AdamW's read-modify-write of fp32 weights, gradients and both moments per step.
  Activations are left out: a lower bound.
* **Lower bound per image** = max(FLOPs / peak bf16 FLOP/s, bytes / memory bandwidth), from the
  vendors' data sheets (dense bf16, SXM parts): H100 SXM5 989 TFLOP/s, 3.35 TB/s; A100 SXM4 80 GB
  312 TFLOP/s, 2.04 TB/s.

    .venv/bin/python bench/bench_roofline.py [--crops 10] [--phrases 4] [--subjects 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fixtures.tiny_models import paper_size as ps

GPUS = {"H100 SXM": (989e12, 3.35e12), "A100 SXM 80GB": (312e12, 2.039e12)}
BF16 = 2


def flops(fn, on_meta: bool = True) -> int:
    """FLOPs ``fn`` runs; ``on_meta``: tensors it makes without a device are made on meta too."""
    with torch.device("meta") if on_meta else torch.device("cpu"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def captioner(batch: int, new_tokens: int) -> dict:
    from transformers import DynamicCache

    spec = ps.load_spec("blip2")
    model = ps.blip2_model(spec, "meta", dtype=torch.float32).eval().requires_grad_(False)
    side = spec["image_processor"]["size"]["height"]
    queries = spec["config"]["num_query_tokens"]
    hidden = spec["config"]["text_config"]["hidden_size"]
    layers = spec["config"]["text_config"]["num_hidden_layers"]
    lm = model.language_model
    head = getattr(model, "lm_head", None) or getattr(lm, "lm_head", None)
    with torch.no_grad():
        def encode():
            vision = model.vision_model(pixel_values=meta(batch, 3, side, side)).last_hidden_state
            q = model.qformer(query_embeds=model.query_tokens.expand(batch, -1, -1), encoder_hidden_states=vision)
            model.language_projection(q.last_hidden_state)
        f_encode = flops(encode)
        cache = DynamicCache()
        prompt = queries + 1  # the image's query tokens, then BOS

        def step(length: int, past):
            out = lm(inputs_embeds=meta(batch, length, hidden), past_key_values=past, use_cache=True)
            states = out.logits if hasattr(out, "logits") else out.last_hidden_state
            if not hasattr(out, "logits") and head is not None:
                head(states[:, -1:])
            return out.past_key_values
        f_decode = 0
        with FlopCounterMode(display=False) as counter:
            cache = step(prompt, cache)
            for _ in range(new_tokens - 1):
                cache = step(1, cache)
        f_decode = int(counter.get_total_flops())
    lm_params = params(lm) + (params(head) if head is not None and head not in lm.modules() else 0)
    encoder_params = params(model.vision_model) + params(model.qformer) + params(model.language_projection)
    kv = sum(2 * layers * hidden * (prompt + t) * BF16 for t in range(new_tokens))  # per sequence
    weights = (encoder_params + new_tokens * lm_params) * BF16 / batch
    return {"flops": (f_encode + f_decode) / batch, "bytes": weights + kv,
            "what": f"BLIP-2 OPT-6.7B, batch {batch}, {side} px, prefill {prompt} + {new_tokens - 1} decode steps"}


def segmenter(batch: int, side: int) -> dict:
    model = ps.mask2former_model(ps.load_spec("mask2former"), "meta").float().eval().requires_grad_(False)
    model.to("meta")  # (transformers builds the pixel decoder's level_embed on the CPU whatever the device)
    with torch.no_grad():
        f = flops(lambda: model(pixel_values=meta(batch, 3, side, side)))
    return {"flops": f / batch, "bytes": params(model) * BF16 / batch,
            "what": f"Mask2Former Swin-L, batch {batch}, {side}x{side} canvas"}


def matcher(crops: int, phrases: int, batch: int) -> dict:
    from transformers import MPNetModel  # noqa: F401 (built by the fixture)

    clip = ps.open_clip_model(ps.load_spec("open_clip"), "meta").float().eval().requires_grad_(False)
    sbert = ps.mpnet_model(ps.load_spec("sbert"), "meta").float().eval().requires_grad_(False)
    tokens = torch.zeros(phrases, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        f_image = flops(lambda: clip.encode_image(meta(crops, 3, 224, 224)))
        f_text = flops(lambda: clip.encode_text(tokens))
        f_sbert = flops(lambda: sbert(input_ids=torch.zeros(phrases, 12, dtype=torch.long, device="meta")))
    per_image_forwards = crops / batch  # crops share forwards of `batch` crops; phrases ride along
    weights = (params(clip) + params(sbert)) * BF16 * max(per_image_forwards, 1 / batch)
    return {"flops": f_image + f_text + f_sbert, "bytes": weights,
            "what": f"ViT-H-14 on {crops} crops + {phrases} phrases, mpnet on {phrases} phrases, batch {batch}"}


def sam3(concepts: int, batch: int) -> dict:
    """``grounding: sam3``: the vision encoder once per image at 1008 px, the text encoder once per
    distinct concept, the DETR encoder/decoder + mask decoder once per (image, concept) prompt.

    The vision encoder is counted on the meta device. The text encoder and the prompt path read values
    (EOS positions, box coordinates) that meta tensors cannot give, so they run for real on the CPU:
    the text encoder at full size, the prompt path at full size behind a one-layer, 32-wide ViT that
    gives the same 72 x 72 patch grid and FPN maps (what the prompt path's cost depends on)."""
    from transformers import Sam3Config, Sam3Model
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    spec = ps.load_spec("sam3")
    model = ps.sam3_model(spec, "meta").float().eval().requires_grad_(False)
    model.to("meta")
    side, words = spec["image_size"], 32  # SAM 3's text encoder takes 32 positions
    with torch.no_grad():
        f_vision = flops(lambda: model.get_vision_features(pixel_values=meta(1, 3, side, side)))
        encoder = type(model.text_encoder)._from_config(model.text_encoder.config).eval()
        projection = torch.nn.Linear(model.text_projection.in_features, model.text_projection.out_features)
        tokens = torch.zeros(concepts, words, dtype=torch.long)
        f_text = flops(lambda: projection(encoder(input_ids=tokens, attention_mask=torch.ones_like(tokens)).last_hidden_state),
                       on_meta=False)
        config = Sam3Config(**spec["config"])
        backbone = config.vision_config.backbone_config
        backbone.hidden_size, backbone.intermediate_size, backbone.num_attention_heads = 32, 64, 2
        backbone.num_hidden_layers, backbone.global_attn_indexes = 1, [0]
        config.text_config.hidden_size, config.text_config.intermediate_size = 32, 64
        config.text_config.num_hidden_layers, config.text_config.num_attention_heads = 1, 2
        slim = Sam3Model(config).eval()
        vision = slim.get_vision_features(pixel_values=torch.zeros(1, 3, side, side))
        width = slim.text_projection.out_features
        f_prompts = flops(lambda: slim(
            vision_embeds=type(vision)(
                fpn_hidden_states=tuple(t.expand(concepts, *t.shape[1:]) for t in vision.fpn_hidden_states),
                fpn_position_encoding=tuple(t.expand(concepts, *t.shape[1:]) for t in vision.fpn_position_encoding)),
            text_embeds=BaseModelOutputWithPooling(pooler_output=torch.zeros(concepts, words, width)),
            attention_mask=torch.ones(concepts, words, dtype=torch.long)), on_meta=False)
    return {"flops": f_vision + f_text + f_prompts, "bytes": params(model) * BF16 / batch,
            "what": f"SAM 3 (~{params(model) / 1e6:.0f}M), 1008 px, {concepts} concepts, {batch} prompts per forward",
            "parts": {"vision": f_vision, "text": f_text, "prompts": f_prompts}}


def faces(side: int = 1024) -> dict:
    from PIL import Image
    from skimage import data

    from datagen.stages.faces import FaceDetector

    detector = FaceDetector("mtcnn", "cpu")
    image = Image.fromarray(data.astronaut()).resize((side, side))
    f = flops(lambda: detector.detect([image], crops=False), on_meta=False)
    weights = sum(params(n) for n in (detector.mtcnn.pnet, detector.mtcnn.rnet, detector.mtcnn.onet))
    return {"flops": f, "bytes": weights * BF16, "what": f"MTCNN on a {side}x{side} photo (real weights, run on CPU)"}


def trainer(batch: int, resolution: int, subjects: int) -> dict:
    sd = ps.load_spec("stable_diffusion")
    unet, vae, text = ps.stable_diffusion_models(sd, "meta")
    vision = ps.clip_vision_model(ps.load_spec("clip_vision"), "meta").float()
    unet, vae, text = unet.float(), vae.float().requires_grad_(False), text.float().requires_grad_(False)
    latent = resolution // 8
    with torch.no_grad():
        f_frozen = flops(lambda: (vae.encode(meta(batch, 3, resolution, resolution)),
                                  text(input_ids=torch.zeros(batch, 77, dtype=torch.long, device="meta"))))
    cond = meta(batch, 77, sd["unet"]["cross_attention_dim"])

    def step():
        out = unet(meta(batch, 4, latent, latent), torch.zeros(batch, dtype=torch.long, device="meta"),
                   encoder_hidden_states=cond).sample
        crops = vision(pixel_values=meta(batch * subjects, 3, 224, 224)).image_embeds
        (out.float().mean() + crops.float().mean()).backward()
    f_train = flops(step)
    trainable = params(unet) + 2 * params(vision) // len(vision.vision_model.encoder.layers)
    weights = (params(unet) * 3 + (params(vision) + params(vae.encoder) + params(text)) * 1) * BF16
    adam = trainable * 4 * 7  # fp32: read weight, grad, m, v; write weight, m, v
    return {"flops": (f_frozen + f_train) / batch, "bytes": (weights + adam) / batch,
            "what": f"SD1.5 U-Net fwd+bwd at {resolution} px, batch {batch}, {subjects} subject crops/img, AdamW"}


def roofline(stage: dict) -> dict[str, float]:
    return {gpu: max(stage["flops"] / peak, stage["bytes"] / bandwidth) for gpu, (peak, bandwidth) in GPUS.items()}


def bound(stage: dict, gpu: str) -> str:
    peak, bandwidth = GPUS[gpu]
    return "memory" if stage["bytes"] / bandwidth > stage["flops"] / peak else "compute"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--crops", type=int, default=10, help="segment crops per image scored by ViT-H-14")
    ap.add_argument("--phrases", type=int, default=4, help="noun phrases per image")
    ap.add_argument("--subjects", type=int, default=2, help="subject crops per training example")
    ap.add_argument("--skip", nargs="*", default=[], help="stages to skip (captioner, segmenter, ...)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("RANDOM WEIGHTS / NO WEIGHTS: paper-size architectures on the meta device (shapes only); the numbers are "
          "arithmetic, not timings")
    stages = {
        "captioner": lambda: captioner(batch=8, new_tokens=30),
        "captioner (batch 32)": lambda: captioner(batch=32, new_tokens=30),
        "segmenter": lambda: segmenter(batch=4, side=640),
        "matcher": lambda: matcher(args.crops, args.phrases, batch=64),
        "sam3": lambda: sam3(args.phrases, batch=8),
        "faces": lambda: faces(),
        "trainer (per example)": lambda: trainer(batch=16, resolution=512, subjects=args.subjects),
    }
    rows = []
    for name, run in stages.items():
        if name.split()[0] in args.skip:
            continue
        start = time.perf_counter()
        stage = run()
        limits = roofline(stage)
        rows.append((name, stage, limits))
        print(f"  counted {name} in {time.perf_counter() - start:.1f} s", flush=True)
    print()
    print("| stage | settings | GFLOP/img | GB moved/img | H100 bound ms/img (img/s) | A100 bound ms/img (img/s) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, stage, limits in rows:
        cells = [f"{limits[g] * 1e3:.2f} ({1 / limits[g]:.0f}, {bound(stage, g)})" for g in GPUS]
        print(f"| {name} | {stage['what']} | {stage['flops'] / 1e9:,.1f} | {stage['bytes'] / 1e9:.3f} | "
              f"{cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

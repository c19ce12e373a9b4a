"""FastComposerModel, its losses, training steps, checkpoints and the sampler (tiny models, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from fixtures.training_shards import build_training_shards
from training.attention_capture import SubjectCrossAttnProcessor
from training.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from training.collate import collate_examples
from training.config import TrainConfig
from training.loader import make_dataset
from training.loop import LocalContext, build_optimizer, train_loop
from training.model import FastComposerModel
from training.preprocess import ExamplePreprocessor
from training.subject_policy import SubjectDropPolicy

RESOLUTION = 64
NO_DROP = SubjectDropPolicy(uncond_prob=0.0, text_only_prob=0.0, keep_prob=1.0, max_subjects=4)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Tiny models run fastest single-threaded on a shared CPU (tests/conftest.py)."""


@pytest.fixture(scope="session")
def model_paths(tiny_model):
    return str(tiny_model("stable-diffusion")), str(tiny_model("clip-vision"))


@pytest.fixture(scope="session")
def shards(sample_source, tmp_path_factory):
    return [str(p) for p in build_training_shards(sample_source, tmp_path_factory.mktemp("model-shards"))]


def load(model_paths, **kwargs):
    torch.manual_seed(0)
    return FastComposerModel.from_pretrained(*model_paths, **kwargs)


def config(model_paths, shards, out, **kwargs) -> TrainConfig:
    values = {"shards": shards, "out": str(out), "pretrained": model_paths[0], "image_encoder": model_paths[1],
              "resolution": RESOLUTION, "batch_size": 2, "loader_workers": 0, "shuffle_buffer": 1, "lr": 1e-3}
    return TrainConfig(**{**values, **kwargs})


def subject_batch(components, shards, size: int = 2) -> dict:
    """A batch whose examples all have subjects (drop policy off, no augmentation)."""
    pre = ExamplePreprocessor(copy.deepcopy(components.tokenizer), components.subject_size, resolution=RESOLUTION,
                              policy=NO_DROP, augment_subjects=False, seed=0)
    stream = iter(make_dataset(shards, pre, seed=0, shuffle_buffer=1))
    examples = []
    while len(examples) < size:
        example = next(stream)
        if example["num_subjects"] > 0:
            examples.append(example)
    return collate_examples(examples)


def test_trainable_set_and_eval_mode(model_paths):
    model = load(model_paths).model
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = len(model.image_encoder.blocks())
    expected_prefixes = ("unet.", "fusion.", *(f"image_encoder.vision_model.vision_model.encoder.layers.{i}."
                                                for i in (blocks - 2, blocks - 1)))
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(expected_prefixes)}
    assert any(n.startswith("image_encoder.") for n in trainable)
    assert not any(n.startswith(("vae.", "text_encoder.")) for n in trainable)
    # frozen components stay in eval mode in train(); the trainable vision blocks train
    assert not model.vae.training and not model.text_encoder.training
    assert not model.image_encoder.vision_model.vision_model.embeddings.training
    assert model.image_encoder.blocks()[-1].training and not model.image_encoder.blocks()[0].training
    assert model.unet.training and model.fusion.training


def test_capture_processor_only_on_hooked_cross_attention(model_paths):
    model = load(model_paths).model
    processors = model.unet.attn_processors
    hooked = {name.removesuffix(".processor") for name, p in processors.items()
              if isinstance(p, SubjectCrossAttnProcessor)}
    assert hooked == set(model.hooked_layers)
    assert all(name.endswith("attn2") for name in hooked)
    prefixes = ("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")
    assert {n.split(".attentions")[0] for n in hooked} == {p.rstrip(".") for p in prefixes}
    others = [p for name, p in processors.items() if name.removesuffix(".processor") not in hooked]
    assert others and all(type(p).__name__ == "AttnProcessor2_0" for p in others)  # the fast path
    with pytest.raises(ValueError, match="down_blocks.3"):
        load(model_paths, localization_layers=("down_blocks.3",))


def test_steps_change_every_trainable_parameter_and_no_frozen_one(model_paths, shards, tmp_path):
    # (crops augmented in the step, as on GPU: this loop path runs here too)
    cfg = config(model_paths, shards, tmp_path, steps=3, checkpoint_every=3, uncond_prob=0.0, text_only_prob=0.0,
                 subject_keep_prob=1.0, augment_subjects_on="device")
    before = {n: p.detach().clone() for n, p in FastComposerModel.from_config(cfg).model.named_parameters()}
    ctx = LocalContext(cfg)
    lines = []
    assert train_loop(cfg, ctx, print_fn=lines.append) == 3
    assert any("subject crops augmented on the training device" in line for line in lines)
    grad_norms = [float(line.split("grad-norm ")[1].split()[0]) for line in lines if line.startswith("step ")]
    assert len(grad_norms) == 3 and all(g > 0 for g in grad_norms)
    unchanged, changed_frozen = [], []
    for name, p in ctx.model.named_parameters():
        same = torch.equal(p.detach(), before[name])
        if p.requires_grad and same:
            unchanged.append(name)
        if not p.requires_grad and not same:
            changed_frozen.append(name)
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    assert not changed_frozen, f"frozen parameters that changed: {changed_frozen[:5]}"
    assert sum(1 for p in ctx.model.parameters() if not p.requires_grad) > 0
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000003"  # LocalContext wrote it to OUT


def test_overfitting_one_batch_lowers_total_and_localization_loss(model_paths, shards, tmp_path):
    # The paper's weight (1e-3) makes the localization term too weak to move in a few dozen steps
    # of a random tiny model; weight 1 shows that its gradient reaches the attention maps.
    components = load(model_paths, localization_weight=1.0)
    model = components.model
    batch = subject_batch(components, shards)
    cfg = config(model_paths, shards, tmp_path)
    optimizer = build_optimizer(model, cfg)
    noise = torch.randn(2, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([500, 700])
    history = []
    model.train()
    for _ in range(30):
        torch.manual_seed(1)  # same VAE latent sample every step
        out = model(batch, noise=noise, timesteps=timesteps, object_region=False)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        history.append((float(out["loss"].detach()), float(out["localization_loss"])))
    (loss0, loc0), (loss1, loc1) = history[0], history[-1]
    assert loss1 < loss0 - 0.3, history
    assert loc1 < loc0 - 0.02, history


def test_balanced_l1_is_background_mean_minus_mask_mean():
    from training.losses import balanced_l1

    masks = torch.zeros(1, 1, 4)
    masks[0, 0, :2] = 1
    on_mask = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 4, 1)  # (B, heads, Q, N)
    assert torch.allclose(balanced_l1(on_mask, masks), torch.tensor([[[-0.5]]]), atol=1e-4)  # 0 - 0.5
    assert torch.allclose(balanced_l1(on_mask.flip(2), masks), torch.tensor([[[0.5]]]), atol=1e-4)  # 0.5 - 0


def test_object_region_loss_is_upstreams_masked_mse_over_every_element():
    """Upstream: mask = (segmaps.sum(1) > 0) resized bilinearly (align_corners=False) to the latent
    size, then F.mse_loss(pred * mask, target * mask) over every element of the batch."""
    from training.losses import denoising_loss, subject_region

    masks = torch.zeros(2, 2, 4, 4, dtype=torch.bool)  # (B, N, H, W) at 2x the latent size
    masks[0, 0, 0, 0] = True  # subject 1: one pixel
    masks[0, 1, 0, :2] = True  # subject 2: that pixel and its right neighbour -> union: 2 pixels
    # example 1 has no subject
    region = subject_region(masks, (2, 2))
    # bilinear 4 -> 2 with align_corners=False samples at 2i + 0.5: the mean of each 2x2 block
    assert torch.equal(region, torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]))
    pred, target = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    # one element differs after masking: ((0 - 2) * 0.5)^2 = 1, over all 8 elements of the batch
    assert torch.allclose(denoising_loss(pred, target, region), torch.tensor(1.0 / 8))
    assert torch.allclose(denoising_loss(pred, target), torch.tensor(4.0))  # the other half of the batches


def test_localization_loss_averages_like_upstream():
    """Per example: sum over its subjects / its count (+1e-5); mean over batch x heads with
    subject-less examples as 0; mean over layers."""
    from training.losses import localization_loss

    attention = torch.zeros(2, 2, 4, 2)  # (B, heads, Q = 2x2, N)
    attention[0, 0, :, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0])  # subject 0 (top row), head 0: 0 - 0.5 = -0.5
    attention[0, 1, :, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # head 1: 0.5 - 0 = +0.5
    attention[0, 0, :, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # subject 1 (top left), head 0: 0 - 1 = -1
    attention[0, 1, :, 1] = torch.tensor([0.0, 0.3, 0.3, 0.3])  # head 1: 0.3 - 0 = +0.3
    attention[1] = 0.7  # example 1 has no subject: whatever it attends, it counts 0
    masks = torch.zeros(2, 2, 2, 2)
    masks[0, 0, 0, :] = 1
    masks[0, 1, 0, 0] = 1
    valid = torch.tensor([[True, True], [False, False]])
    # example 0: head 0 (-0.5 - 1) / 2 = -0.75, head 1 (0.5 + 0.3) / 2 = 0.4; example 1: 0, 0
    one_layer = (-0.75 + 0.4 + 0 + 0) / 4  # = -0.0875 (averaging over all subjects would give -0.175)
    assert torch.allclose(localization_loss({"a": attention}, masks, valid), torch.tensor(one_layer), atol=1e-4)
    uniform = torch.full_like(attention, 0.25)  # a layer whose maps do not localise: 0
    loss = localization_loss({"a": attention, "b": uniform}, masks, valid)
    assert torch.allclose(loss, torch.tensor(one_layer / 2), atol=1e-4)


def test_checkpoint_round_trip_and_latest(model_paths, shards, tmp_path):
    components = load(model_paths)
    model = components.model
    cfg = config(model_paths, shards, tmp_path)
    optimizer = build_optimizer(model, cfg)
    model(subject_batch(components, shards))["loss"].backward()
    optimizer.step()
    for n in (1, 12):
        save_checkpoint(model, optimizer, n, cfg.to_dict(), tmp_path / "run" / f"checkpoint-{n:08d}", {"loss": 1.0})
    (tmp_path / "run" / "checkpoint-99999999").mkdir()  # unfinished: no trainer_state.json
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "run" / "checkpoint-00000012"
    assert read_state(latest)["config"]["resolution"] == RESOLUTION
    fresh = load(model_paths).model
    fresh_optimizer = build_optimizer(fresh, cfg)
    state = load_checkpoint(latest, fresh, fresh_optimizer)
    assert state["step"] == 12
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert len(fresh_optimizer.state_dict()["state"]) == len(model.trainable_parameters())


def test_an_fp16_runs_gradient_scaler_resumes_with_its_scale(model_paths, tmp_path):
    """The loss scale an fp16 run reached is saved with the checkpoint and restored on resume (a fresh
    scaler would start again at 65536 and skip steps until it backs off); bf16/fp32 save none."""
    model = load(model_paths).model
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    scaler.scale(torch.ones(1))  # its scale is made on first use
    scaler.update(new_scale=16.0)
    save_checkpoint(model, None, 5, {}, tmp_path / "fp16", scaler=scaler)
    save_checkpoint(model, None, 5, {}, tmp_path / "bf16", scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert (tmp_path / "fp16" / "grad_scaler.pt").is_file() and not (tmp_path / "bf16" / "grad_scaler.pt").exists()
    resumed = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "fp16", model, scaler=resumed)
    assert resumed.get_scale() == 16.0
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "bf16", model, scaler=fresh)  # nothing saved: the initial scale
    assert fresh.get_scale() == 65536.0


def test_sampler_schedule_is_upstreams():
    """PNDM as SD1.5 configures it, 50 steps, guidance 5; text-only while i <= int((1 - alpha) T)."""
    import inspect

    from diffusers import PNDMScheduler

    from training.sampler import FastComposerSampler, make_scheduler, start_merge_step

    assert start_merge_step(0.7, 50) == 15  # steps 0..15 text-only: (1 - 0.7) * 50 = 15.000000000000002
    assert start_merge_step(0.8, 50) == 9  # (1 - 0.8) * 50 = 9.999999999999998: upstream's i <= 9.99.. stops at 9 too
    assert start_merge_step(1.0, 50) == 0  # step 0 stays text-only, as upstream
    assert start_merge_step(0.0, 50) == 50  # every step text-only
    tiny_like = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "steps_offset": 0}
    scheduler = make_scheduler("pndm", tiny_like)
    assert isinstance(scheduler, PNDMScheduler)
    assert (scheduler.config.skip_prk_steps, scheduler.config.steps_offset, scheduler.config.set_alpha_to_one) == (
        True, 1, False)
    scheduler.set_timesteps(50)
    # PLMS only: timesteps 20k + 1 (k = 49..0) with the second repeated -> 51 model calls
    assert scheduler.timesteps[:4].tolist() == [981, 961, 961, 941] and scheduler.timesteps[-1] == 1
    assert len(scheduler.timesteps) == 51
    defaults = inspect.signature(FastComposerSampler.generate).parameters
    assert (defaults["steps"].default, defaults["guidance_scale"].default, defaults["alpha"].default,
            defaults["scheduler"].default) == (50, 5.0, 0.7, "pndm")
    assert type(make_scheduler("ddim", tiny_like)).__name__ == "DDIMScheduler"


def test_sampler_generates_with_delayed_subject_conditioning(model_paths, shards, tmp_path, sample_source):
    from PIL import Image

    from cli.main import main
    from training.sampler import FastComposerSampler, SamplerError, Subject

    cfg = config(model_paths, shards, tmp_path / "run", steps=1)
    lines = []
    train_loop(cfg, LocalContext(cfg), print_fn=lines.append)
    assert any("subject crops augmented in the loader" in line for line in lines)  # CPU: auto -> loader
    sampler = FastComposerSampler.from_checkpoint(tmp_path / "run", device="cpu")
    # the unconditional branch is the empty negative prompt, tokenized as diffusers does
    empty = sampler.subject_tokenizer.tokenizer("", padding="max_length", max_length=77, truncation=True,
                                                return_tensors="pt").input_ids
    null, _, _ = sampler.conditioning("a woman on the beach", [])
    assert torch.equal(null, sampler.model.encode_text(empty))
    photo = Image.open(sample_source / "in-the-wild-images/00000/00000.png").convert("RGB")
    subjects = [Subject("woman", photo)]
    prompt = "a woman on the beach"
    kwargs = {"steps": 4, "guidance_scale": 3.0, "seed": 7}
    text_only = sampler.generate(prompt, [], alpha=0.7, **kwargs)
    delayed_all_text = sampler.generate(prompt, subjects, alpha=0.0, **kwargs)
    with_subject = sampler.generate(prompt, subjects, alpha=1.0, **kwargs)
    assert text_only.size == (RESOLUTION, RESOLUTION) and text_only.mode == "RGB"
    assert len(set(text_only.getdata())) > 10  # a decoded image, not a constant
    assert list(delayed_all_text.getdata()) == list(text_only.getdata())  # alpha 0: subjects never used
    assert list(with_subject.getdata()) != list(text_only.getdata())  # alpha 1: they change the image
    with pytest.raises(SamplerError, match="'man'"):
        sampler.generate("a woman on the beach", [Subject("man", photo)], **kwargs)

    photo_path = tmp_path / "her.png"
    photo.save(photo_path)
    out = tmp_path / "out" / "beach.png"
    code = main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--subject",
                 f"woman={photo_path}", "--out", str(out), "--steps", "2", "--device", "cpu"])
    assert code == 0
    with Image.open(out) as written:
        assert written.size == (RESOLUTION, RESOLUTION)


def test_train_command_rejects_bad_setup_before_starting(tmp_path, capsys, model_paths, shards):
    from cli.main import main

    code = main(["train", "--shards", str(tmp_path / "none-*.tar"), "--profile", "tiny", "--out", str(tmp_path / "o")])
    assert code == 2 and "no shard file matches" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"trainer:\n  pretrained: {tmp_path / 'no-such-model'}\n  image_encoder: {model_paths[1]}\n")
    code = main(["train", "--shards", shards[0], "--profile", "tiny", "--config", str(missing), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no-such-model" in err and "does not exist" in err

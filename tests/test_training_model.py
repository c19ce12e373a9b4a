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
from training.loop import TrainStep, build_optimizer
from training.model import FastComposerModel
from training.preprocess import ExamplePreprocessor
from training.subject_policy import SubjectDropPolicy

RESOLUTION = 64
NO_DROP = SubjectDropPolicy(uncond_prob=0.0, text_only_prob=0.0, keep_prob=1.0, max_subjects=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a shared CPU (no thread oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    components = load(model_paths)
    model = components.model
    batch = subject_batch(components, shards)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(model_paths, shards, tmp_path)
    step = TrainStep(model, build_optimizer(model, cfg), cfg, torch.device("cpu"))
    for _ in range(3):
        result = step([batch])
        assert result.grad_norm > 0
    unchanged, changed_frozen = [], []
    for name, p in model.named_parameters():
        same = torch.equal(p.detach(), before[name])
        if p.requires_grad and same:
            unchanged.append(name)
        if not p.requires_grad and not same:
            changed_frozen.append(name)
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    assert not changed_frozen, f"frozen parameters that changed: {changed_frozen[:5]}"
    assert sum(1 for p in model.parameters() if not p.requires_grad) > 0


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


def test_losses_have_expected_values_on_constructed_maps():
    from training.losses import balanced_l1, denoising_loss, localization_loss, subject_region

    # attention concentrated on the mask gives a negative balanced L1, spread on background positive
    masks = torch.zeros(1, 1, 4)
    masks[0, 0, :2] = 1
    on_mask = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 1, 4, 1)
    assert torch.allclose(balanced_l1(on_mask, masks), torch.tensor([[-0.5]]), atol=1e-4)
    assert torch.allclose(balanced_l1(on_mask.flip(2), masks), torch.tensor([[0.5]]), atol=1e-4)
    # padding subjects do not count
    maps = {"layer": torch.cat([on_mask, on_mask.flip(2)], dim=3)}  # (1, 1, 4, 2)
    full_masks = torch.zeros(1, 2, 2, 2)
    full_masks[0, :, 0, :] = 1  # top row, i.e. positions 0 and 1 of the 2x2 map
    loss = localization_loss(maps, full_masks, torch.tensor([[True, False]]))
    assert torch.allclose(loss, torch.tensor(-0.5), atol=1e-4)
    # object-region MSE counts only the region; an example without subjects counts whole
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[0, 0, 0, 0] = 3.0
    region = subject_region(torch.tensor([[[[True, False], [False, False]]], [[[False, False], [False, False]]]]), (2, 2))
    assert torch.allclose(region[1], torch.ones(1, 2, 2))
    expected = (9.0 + 4 * 1.0) / 5  # example 0: only its region pixel (9); example 1: all four (1 each)
    assert torch.allclose(denoising_loss(pred, target, region), torch.tensor(expected))


def test_checkpoint_round_trip_and_latest(model_paths, shards, tmp_path):
    components = load(model_paths)
    model = components.model
    cfg = config(model_paths, shards, tmp_path)
    step = TrainStep(model, build_optimizer(model, cfg), cfg, torch.device("cpu"))
    step([subject_batch(components, shards)])
    for n in (1, 12):
        save_checkpoint(model, step.optimizer, n, cfg.to_dict(), tmp_path / "run" / f"checkpoint-{n:08d}", {"loss": 1.0})
    (tmp_path / "run" / "checkpoint-99999999").mkdir()  # unfinished: no trainer_state.json
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "run" / "checkpoint-00000012"
    assert read_state(latest)["config"]["resolution"] == RESOLUTION
    fresh = load(model_paths).model
    optimizer = build_optimizer(fresh, cfg)
    state = load_checkpoint(latest, fresh, optimizer)
    assert state["step"] == 12
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert optimizer.state_dict()["state"].keys() == step.optimizer.state_dict()["state"].keys()
    assert len(optimizer.state_dict()["state"]) == len(model.trainable_parameters())


def test_sampler_generates_with_delayed_subject_conditioning(model_paths, shards, tmp_path, sample_source):
    from PIL import Image

    from cli.main import main
    from training.sampler import FastComposerSampler, SamplerError, Subject

    components = load(model_paths)
    cfg = config(model_paths, shards, tmp_path)
    TrainStep(components.model, build_optimizer(components.model, cfg), cfg, torch.device("cpu"))(
        [subject_batch(components, shards)])
    save_checkpoint(components.model, None, 1, cfg.to_dict(), tmp_path / "run" / "checkpoint-00000001")
    sampler = FastComposerSampler.from_checkpoint(tmp_path / "run", device="cpu")
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

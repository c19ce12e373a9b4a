"""resolve_model: local folders, missing paths, hub ids in and out of the HF cache, offline; device/dtype."""

from __future__ import annotations

import socket

import pytest
import torch

from datagen.stages.model_loading import (
    ModelNotFoundError,
    hf_cache_dir,
    hub_offline,
    looks_like_path,
    pick_device,
    pick_dtype,
    resolve_model,
)

REPO = "Salesforce/blip2-opt-6.7b-coco"


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a network connection."""
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted to {address!r}")

    def refuse_create(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access attempted to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    return attempts


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def fake_cached_repo(cache, repo_id: str, files: dict[str, str]):
    """Lay out ``repo_id`` in the HF cache format (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_existing_folder_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), "captioner") == str(tmp_path)


def test_missing_local_folder_names_model_place_and_remedy(tmp_path):
    missing = tmp_path / "tiny" / "blip2"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(str(missing), "captioner (BLIP-2)")
    msg = str(err.value)
    assert "captioner (BLIP-2)" in msg
    assert str(missing) in msg
    assert "does not exist" in msg
    assert "subject-ffhq tiny-models DIR" in msg and "SUBJECT_FFHQ_TINY_MODELS" in msg


def test_relative_path_is_never_taken_for_a_hub_id(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online, a path is not sent to the hub
    with pytest.raises(ModelNotFoundError, match="out/tiny-models/blip2"):
        resolve_model("out/tiny-models/blip2", "captioner")
    assert no_network == []


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model(str(f), "segmenter")


def test_local_dir_prefix_keeps_the_prefix(tmp_path):
    assert resolve_model(f"local-dir:{tmp_path}", "matcher") == f"local-dir:{tmp_path}"
    with pytest.raises(ModelNotFoundError, match="open_clip_gone"):
        resolve_model(f"local-dir:{tmp_path / 'open_clip_gone'}", "matcher")


def test_uncached_hub_id_offline_fails_at_once_without_network(empty_cache, no_network):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(REPO, "captioner (BLIP-2)")
    msg = str(err.value)
    assert REPO in msg and "captioner (BLIP-2)" in msg
    assert str(empty_cache) in msg  # where it looked
    assert "HF_HUB_OFFLINE" in msg  # why the hub was not asked
    assert "hub access" in msg and "subject-ffhq tiny-models" in msg  # how to get it
    assert no_network == []  # local_files_only: the cache was read, the network never touched


def test_cached_hub_id_offline_resolves_to_the_snapshot(empty_cache, no_network):
    snap = fake_cached_repo(empty_cache, REPO, {"config.json": '{"model_type": "blip-2"}', "model.safetensors": "w"})
    assert resolve_model(REPO, "captioner") == str(snap)
    assert no_network == []


def test_hub_id_online_is_passed_through(monkeypatch, empty_cache, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    assert resolve_model(REPO, "captioner") == REPO
    assert no_network == []


def test_offline_switch_and_cache_dir_are_read_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"


@pytest.mark.parametrize(
    ("ref", "is_path"),
    [("Salesforce/blip2-opt-6.7b-coco", False), ("gpt2", False), ("/abs/blip2", True), ("./blip2", True),
     ("~/models/blip2", True), ("out/tiny-models/blip2", True), ("..", True)],
)
def test_looks_like_path(ref, is_path):
    assert looks_like_path(ref) is is_path


def test_empty_reference_is_refused():
    with pytest.raises(ModelNotFoundError, match="no model given"):
        resolve_model("", "captioner")


def test_pick_device():
    assert pick_device("cpu") == "cpu"
    assert pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_pick_dtype_auto_and_explicit(monkeypatch):
    assert pick_dtype("cpu", "auto") is torch.float32
    assert pick_dtype("cpu", None) is torch.float32
    assert pick_dtype("cpu", "bf16") is torch.bfloat16
    assert pick_dtype("cuda", "fp32") is torch.float32
    assert pick_dtype("cuda:0", "float16") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("cuda", "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype("cuda:1", "auto") is torch.float16
    assert pick_dtype("cpu", "auto") is torch.float32
    with pytest.raises(ValueError, match="int8"):
        pick_dtype("cpu", "int8")

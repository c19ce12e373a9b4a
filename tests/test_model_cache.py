"""The offline model check accepts a Hugging Face cache laid out the way ``from_pretrained``'s download
leaves it (only the files loading needs, under ``models--org--name/snapshots/<rev>/``, the repo's whole
file list recorded beside them) and refuses one that lacks what the loader reads, naming it."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from datagen.stages.model_loading import ModelNotFoundError, load_pretrained, resolve_model


def cache_like_from_pretrained(folder: Path, cache: Path, repo_id: str, listed_too: tuple[str, ...] = ()) -> Path:
    """``folder``'s files as the hub cache holds a download: content-addressed blobs, the snapshot of
    revision ``<rev>`` made of relative symlinks to them, ``refs/main`` naming the revision, and the
    repo's file list (``trees/<rev>.json``, written by huggingface_hub's own writer) naming
    ``listed_too`` as well: files the repo has that loading never fetched. Returns the snapshot."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        entries[str(path.relative_to(folder))] = TreeCacheEntry(size=len(data), blob_id=hashlib.sha1(data).hexdigest(),
                                                                lfs_sha256=None, lfs_size=None, xet_hash=None)
    for name in listed_too:
        entries[name] = TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None, lfs_size=None, xet_hash=None)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    write_tree_cache(str(repo), revision, entries)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cache_filled_by_from_pretrained_passes_the_check_and_loads(tiny_model, offline_cache):
    from huggingface_hub import snapshot_download
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    # the repo also has a second weights format and a model card that loading never downloads
    snapshot = cache_like_from_pretrained(tiny_model("blip2"), offline_cache, "tiny-org/blip2",
                                          listed_too=("pytorch_model.bin", "README.md", ".gitattributes"))
    with pytest.raises(Exception, match="incomplete"):  # what the check used to call, and why it refused
        snapshot_download("tiny-org/blip2", cache_dir=offline_cache, local_files_only=True)
    # the layout is the one from_pretrained reads by id
    assert Blip2Config.from_pretrained("tiny-org/blip2", cache_dir=offline_cache, local_files_only=True)
    assert resolve_model("tiny-org/blip2", "captioner (BLIP-2)") == str(snapshot)
    processor, model, _ = load_pretrained("tiny-org/blip2", "captioner (BLIP-2)", Blip2Processor,
                                          Blip2ForConditionalGeneration, "cpu")
    assert model.config.model_type == "blip-2" and processor.tokenizer is not None


def test_a_cache_without_what_the_loader_reads_is_refused_naming_it(tiny_model, offline_cache):
    snapshot = cache_like_from_pretrained(tiny_model("blip2"), offline_cache, "tiny-org/blip2")
    tokenizer_file = next(n for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json") if (snapshot / n).exists())
    (snapshot / tokenizer_file).unlink()
    with pytest.raises(ModelNotFoundError, match=rf"is in the Hugging Face cache \(.*\) but incomplete: the "
                                                 rf"processor/tokenizer file\(s\) .*{tokenizer_file}"):
        resolve_model("tiny-org/blip2", "captioner (BLIP-2)")
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"incomplete: no weights file \(\*\.safetensors or \*\.bin\)"):
        resolve_model("tiny-org/blip2", "captioner (BLIP-2)")
    with pytest.raises(ModelNotFoundError, match=r"'tiny-org/absent' is not in the Hugging Face cache"):
        resolve_model("tiny-org/absent", "captioner (BLIP-2)")


def test_sharded_weights_need_every_shard_their_index_names(tiny_model, offline_cache, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model("blip2"), sharded)
    (sharded / "model.safetensors").unlink()
    Blip2ForConditionalGeneration.from_pretrained(tiny_model("blip2")).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()
    snapshot = cache_like_from_pretrained(sharded, offline_cache, "tiny-org/blip2-sharded")
    assert resolve_model("tiny-org/blip2-sharded", "captioner (BLIP-2)") == str(snapshot)
    (snapshot / shards[-1].name).unlink()
    with pytest.raises(ModelNotFoundError, match=rf"model.safetensors.index.json names shard\(s\) not there: "
                                                 rf"{shards[-1].name}"):
        resolve_model("tiny-org/blip2-sharded", "captioner (BLIP-2)")


def test_a_pipeline_needs_only_the_parts_its_loader_reads(tiny_model, offline_cache, capsys, tmp_path):
    from training.config import SD_PARTS

    # the trainer reads five parts of SD1.5; the repo's safety checker and feature extractor are never fetched
    snapshot = cache_like_from_pretrained(tiny_model("stable-diffusion"), offline_cache, "tiny-org/sd",
                                          listed_too=("safety_checker/model.safetensors", "feature_extractor/x.json"))
    assert resolve_model("tiny-org/sd", "trainer base", parts=SD_PARTS) == str(snapshot)
    weights = next((snapshot / "unet").glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match=r"incomplete: no weights file \(\*\.safetensors or \*\.bin\) in unet/"):
        resolve_model("tiny-org/sd", "trainer base", parts=SD_PARTS)

    # the train command stops on it with one line, before Ray starts
    from cli.main import main

    config = tmp_path / "cached.yaml"
    config.write_text(f"trainer:\n  pretrained: tiny-org/sd\n  image_encoder: {tiny_model('clip-vision')}\n")
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"")
    capsys.readouterr()  # (what building the tiny models printed)
    code = main(["train", "--shards", str(shard), "--profile", "tiny", "--config", str(config), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "in unet/" in err and err.startswith("subject-ffhq train: error:")

"""Stream shards into training batches: WebDataset over a shard list (paths or bucket URLs), endless,
split across nodes and loader workers.

Shard order: every pass over the data ("epoch") is a fresh shuffle of the shard list (seeded by
``seed`` and the epoch number), split across training processes with ``wds.split_by_node`` (Ray
Train sets ``RANK``/``WORLD_SIZE``) and across DataLoader workers with ``wds.split_by_worker``,
then the next epoch starts: step-based training never runs dry. When there are fewer shards than
(processes × loader workers), an exact split would leave some loader workers without data; each
then resamples shards at random (seeded per process and worker) instead.

Per sample: the tar members are shuffled in a buffer, decoded (``.jpg`` → uint8 tensor,
``.seg.png`` → segment ids, ``.json`` → :class:`~datagen.record.schema.Record`, validated), records of
other splits skipped (train on ``split="train"`` only), and turned into an example by
:class:`~training.preprocess.ExamplePreprocessor`. A sample that cannot be read raises a
:class:`~training.preprocess.SampleError` naming the shard, the key and the reason; with
``bad_samples="warn"`` it is logged instead and skipped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from torchvision.io import ImageReadMode, decode_jpeg

from datagen import storage
from datagen.identity.split import cached_split, split_file_path
from datagen.record.schema import Record
from datagen.shards.reader import ShardError, TarSample
from training.collate import collate_examples
from training.preprocess import ExamplePreprocessor, SampleError

log = logging.getLogger(__name__)


def _slot() -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) of the current process, as webdataset sees them."""
    return wds.utils.pytorch_worker_info()


def _slot_seed(seed: int, *parts: int) -> int:
    return hash((seed, *parts)) & 0x7FFFFFFF


class EndlessShardOrder(IterableDataset):
    """Yields ``{"url": shard}`` forever (see the module docstring)."""

    def __init__(self, shards: list[str], seed: int = 0):
        super().__init__()
        if not shards:
            raise ValueError("no shards to stream")
        self.shards = list(shards)
        self.seed = seed

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, num_workers = _slot()
        if len(self.shards) < world_size * num_workers:
            rng = random.Random(_slot_seed(self.seed, rank, worker))
            while True:
                yield {"url": rng.choice(self.shards)}
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(_slot_seed(self.seed, epoch)).shuffle(order)
            urls = ({"url": u} for u in order)
            yield from wds.split_by_worker(wds.split_by_node(urls))
            epoch += 1


class ShuffleSamples:
    """A webdataset stage: buffer-shuffle samples with a generator seeded per process and worker."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed

    def __call__(self, src):
        if self.bufsize <= 1:
            yield from src
            return
        rank, _, worker, _ = _slot()
        rng = random.Random(_slot_seed(self.seed, rank, worker, 1))
        yield from wds.filters._shuffle(src, bufsize=self.bufsize, initial=max(1, self.bufsize // 4), rng=rng)


def shard_samples(src, handler=wds.reraise_exception):
    """webdataset's ``tarfile_to_samples`` with the shards opened by :func:`datagen.storage.open_stream`:
    a shard on a bucket (``s3://...``) streams like a local one, through the same filesystem (endpoint,
    credentials) as every other read."""

    def opened(urls):
        for sample in urls:
            try:
                sample.update(stream=storage.open_stream(sample["url"]))
            except Exception as exn:  # noqa: BLE001 -- the handler decides (raise, or warn and skip)
                exn.args = (*exn.args, sample["url"])
                if handler(exn):
                    continue
                break
            yield sample

    files = wds.tariterators.tar_file_expander(opened(src), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def decode_training_sample(raw: dict) -> tuple[torch.Tensor, np.ndarray, Record]:
    """A raw tar sample → (image uint8 (3, H, W), segment map (H, W), validated record), checked by
    the shard reader's :class:`~datagen.shards.reader.TarSample`; only the JPEG is decoded here,
    by torchvision (straight to a tensor, faster than Pillow)."""
    sample = TarSample.of(str(raw.get("__url__", "?")), str(raw.get("__key__", "?")), raw)
    record = sample.record()
    image = decode_jpeg(torch.frombuffer(bytearray(raw["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    segment_map = sample.segment_map()
    sample.check_sizes((image.shape[2], image.shape[1]), segment_map, record)
    return image, segment_map, record


class ExampleStage:
    """A webdataset stage: raw samples → training examples, with the bad-sample policy."""

    def __init__(self, preprocessor: ExamplePreprocessor, split: str | None, bad_samples: str, seed: int,
                 split_file: str | None = None):
        self.preprocessor = preprocessor
        self.split = split
        self.split_file = split_file  # the identity-safe split, read once per loader process
        self.bad_samples = bad_samples
        self.seed = seed

    def __call__(self, src):
        rank, _, worker, _ = _slot()
        self.preprocessor.reseed(_slot_seed(self.seed, rank, worker, 2))
        torch.manual_seed(_slot_seed(self.seed, rank, worker, 3))
        # read once, outside the per-sample policy: an unreadable split file stops the loader, it is not
        # a bad sample (functools.cache keeps no exception: under "warn" it skipped every sample)
        safe_split = cached_split(self.split_file) if self.split_file is not None else None
        for raw in src:
            where = f"shard {raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
            try:
                image, segment_map, record = decode_training_sample(raw)
                if safe_split is not None:
                    record.split = safe_split.get(record.key, record.split)
                if self.split is not None and record.split != self.split:
                    continue
                example = self.preprocessor(image, segment_map, record)
            except (ValueError, RuntimeError, OSError) as e:
                # a ShardError already names the shard and the key
                error = SampleError(str(e) if isinstance(e, ShardError) else f"{where}: {e}")
                if self.bad_samples == "raise":
                    raise error from e
                log.warning("skipping bad sample: %s", error)
                continue
            yield example


def make_dataset(
    shards: list[str],
    preprocessor: ExamplePreprocessor,
    *,
    seed: int = 0,
    split: str | None = "train",
    shuffle_buffer: int = 256,
    bad_samples: str = "raise",
    split_file: str | None = None,
) -> wds.DataPipeline:
    handler = wds.reraise_exception if bad_samples == "raise" else wds.warn_and_continue
    return wds.DataPipeline(
        EndlessShardOrder(shards, seed),
        wds.pipelinefilter(shard_samples)(handler=handler),
        ShuffleSamples(shuffle_buffer, seed),
        ExampleStage(preprocessor, split, bad_samples, seed, split_file),
    )


def make_loader(
    dataset: wds.DataPipeline, batch_size: int, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over the endless example stream (iterate it with ``iter``; it never ends)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_examples,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def loader_from_config(cfg, preprocessor: ExamplePreprocessor, seed: int, pin_memory: bool = False) -> DataLoader:
    dataset = make_dataset(
        cfg.shards, preprocessor, seed=seed, split=cfg.split, shuffle_buffer=cfg.shuffle_buffer,
        bad_samples=cfg.bad_samples, split_file=split_file_path(cfg.split_file),
    )
    return make_loader(dataset, cfg.batch_size, cfg.loader_workers, pin_memory=pin_memory)

"""What moves between the job's tasks and actors: a shard's chunk after loading, and after encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from datagen.sources.images import LoadedImage


@dataclass
class LoadedChunk:
    """A chunk after loading: the images that decoded, and why the others did not."""

    shard: int
    chunk: int
    loaded: list[LoadedImage]
    failed: dict[str, str] = field(default_factory=dict)  # source_id -> reason
    seconds: float = 0.0  # time spent loading

    @property
    def images(self) -> list:
        return [li.image for li in self.loaded]


@dataclass
class EncodedSample:
    key: str
    jpg: bytes
    seg_png: bytes
    json: bytes
    shard_rows: dict = field(default_factory=dict)  # stage -> its rows of that stage's shard table (not in the tar)


@dataclass
class EncodedChunk:
    """A chunk ready for the tar: encoded samples (plan order) and every item's outcome."""

    samples: list[EncodedSample]
    outcomes: dict[str, tuple[str, str | None]]  # source_id -> (status, reason)
    load_seconds: float = 0.0
    encode_seconds: float = 0.0

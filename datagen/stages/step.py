"""What every stage of the build is to the job: a *step* with one batched entry, :meth:`Step.run`.

A step is built once per worker from the whole profile and the device it runs on (a stage may read
more than its own section: the matcher reads ``phrases`` and the segmenter's label set), then runs
over chunks, datatrove-style::

    step.run(loaded, *earlier)  ->  one result (or StageFailure) per loaded image

``loaded`` is the chunk's :class:`~datagen.sources.images.LoadedImage` list; ``earlier`` holds, in
the order the stage table's ``takes`` names them, the outputs of earlier stages for the same images.
:meth:`Step.run` passes an image whose earlier output is a
:class:`~datagen.stages.failures.StageFailure` through unchanged (its first failure) and gives the
step's own :meth:`Step.process` only the images every earlier stage handled; ``process`` runs its
model through :func:`~datagen.stages.failures.in_batches`, so one bad image fails alone.

What the job needs to know of a stage without running it is here too, as class methods that load no
model: :meth:`Step.model_ids` (the ids a record carries), :meth:`Step.check_models` (every model
is there, checked before Ray starts) and :meth:`Step.record_fields` (what a stage outside the record
contract adds to each record). The list of stages is :mod:`datagen.stage_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from datagen.stages.failures import StageFailure

if TYPE_CHECKING:
    from datagen.config import Profile
    from datagen.sources.images import LoadedImage

PROBE_SIZE = (64, 48)


class Step:
    """One stage over a chunk. Subclasses set :attr:`name` (the stage table's) and implement
    :meth:`process`; :attr:`images` counts the images processed (the stage's rate)."""

    name = ""
    # A folder under the run's manifests where the job writes, per shard and before its entry, one
    # Parquet table of this stage's shard_rows with this schema (a shard without it is redone on
    # resume); kept out of the tar. None: the stage has no such table.
    shard_table: str | None = None

    def __init__(self, profile: Profile, device: str):
        self.profile = profile
        self.device = device
        self.images = 0  # images handed to process() since this step was built

    def run(self, loaded: Sequence[LoadedImage], *earlier: Sequence[Any]) -> list:
        """One result per image of ``loaded``: an earlier stage's failure passes through, the other
        images go to :meth:`process` (with their earlier outputs, column by column)."""
        out: list = [None] * len(loaded)
        todo: list[int] = []
        for i in range(len(loaded)):
            failure = next((e[i] for e in earlier if isinstance(e[i], StageFailure)), None)
            if failure is None:
                todo.append(i)
            else:
                out[i] = failure
        self.images += len(todo)
        if todo:
            results = self.process([loaded[i] for i in todo], *([e[i] for i in todo] for e in earlier))
            if len(results) != len(todo):
                raise RuntimeError(f"{self.name}: returned {len(results)} results for {len(todo)} images")
            for i, result in zip(todo, results, strict=True):
                out[i] = result
        return out

    def process(self, loaded: list[LoadedImage], *earlier: list) -> list:
        raise NotImplementedError

    @classmethod
    def model_ids(cls, profile: Profile) -> dict[str, str]:
        """The model ids a record carries for this stage (``{}``: none)."""
        return {}

    @classmethod
    def check_models(cls, profile: Profile) -> None:
        """Raise ``ModelNotFoundError`` naming a model of this stage that is not there; loads nothing."""

    @classmethod
    def provided(cls, outputs: list, name: str) -> list:
        """This stage's outputs (one per image) as those of stage ``name``, which its table row
        ``provides`` (a stage standing in for others); failures pass through. Default: unchanged."""
        return outputs

    @classmethod
    def shard_schema(cls) -> Any:
        """The pyarrow schema of :attr:`shard_table`."""
        return None

    @classmethod
    def shard_rows(cls, key: str, output: Any) -> list[dict[str, Any]]:
        """The :attr:`shard_table` rows this stage's output for sample ``key`` adds."""
        return []

    @classmethod
    def record_fields(cls, output: Any) -> dict[str, Any]:
        """Top-level record fields this stage adds from its output for one image (``{}``: none).
        The contract stages fill the record themselves (:mod:`datagen.record.build`)."""
        return {}


class ImageModelStep(Step):
    """A stage whose one model takes the images alone (captioner, segmenter): its section (named like
    the stage) names the model (``model``) and the images per model call (``batch_size``);
    :attr:`what` names the model in messages. Subclasses implement :meth:`run_model`."""

    what = ""

    @property
    def section(self) -> Any:
        return self.profile.section(self.name)

    def run_model(self, images: list) -> list:
        raise NotImplementedError

    def process(self, loaded: list) -> list:
        from datagen.stages.failures import in_batches

        images = [li.image for li in loaded]
        return in_batches(self.name, self.run_model, images, labels_of(loaded), self.section.batch_size, probe_image)

    @classmethod
    def model_ids(cls, profile: Profile) -> dict[str, str]:
        return {cls.name: profile.section(cls.name).model}

    @classmethod
    def check_models(cls, profile: Profile) -> None:
        from datagen.stages.model_loading import resolve_model

        resolve_model(profile.section(cls.name).model, cls.what)


def labels_of(loaded: Sequence[LoadedImage]) -> list[str]:
    """What a failure names each image by: its path inside the source."""
    return [li.item.rel_path for li in loaded]


def probe_image():
    """A plain grey picture every stage must handle: the known-good input of the probes."""
    from PIL import Image

    return Image.new("RGB", PROBE_SIZE, (128, 128, 128))

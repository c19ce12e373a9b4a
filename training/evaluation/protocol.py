"""The evaluation protocol: subjects, prompts, and the list of images to generate (FastComposer §5.1-5.3).

**Subjects** (``--subjects DIR``): one entry per subject, sorted by name:

* a sub-folder ``DIR/NAME/`` holding one or more photos: the first photo by file name conditions the
  generation (FastComposer's evaluation does the same); every photo's face counts for identity (their
  mean embedding) and for the leak check. An optional ``DIR/NAME/word.txt`` gives the subject's class
  word (``man``, ``woman``, ...);
* or a photo ``DIR/NAME.jpg`` (``.jpeg .png .webp .bmp``) on its own.

The class word defaults to ``person`` (``--subject-word``).

**Prompts** (``--prompts FILE``): one prompt per line; blank lines and lines starting with ``#`` are
skipped, and ``# category: NAME`` sets the category of the prompts below it. ``{}`` marks a subject:
it is replaced by that subject's class word, and the sampler binds the subject to exactly that word
(the sampler's convention: a subject is a word of the prompt). ``a {} wearing a red hat`` becomes
``a woman wearing a red hat`` with the woman's photo bound to ``woman``. Single-subject prompts hold
one ``{}``; multi-subject prompts hold two or more, and every combination of that many subjects is
used (15 subjects, two ``{}``: the 105 pairs). The filled prompt is also the text for prompt
consistency: our prompts carry no special subject tokens to remove.

**Seeds**: image ``k`` of every (subjects, prompt) uses seed ``seed + k``, for our model and the
text-only baseline alike, so rows are paired.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
BUILTIN_PROMPTS = {"single": PROMPTS_DIR / "single_subject.txt", "multi": PROMPTS_DIR / "multi_subject.txt"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SLOT = "{}"
WORD_FILE = "word.txt"
DEFAULT_WORD = "person"
OURS, BASELINE = "ours", "text-only SD"


class ProtocolError(ValueError):
    """Bad subjects folder or prompt file; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SubjectSpec:
    name: str
    word: str
    photos: tuple[str, ...]  # absolute paths; photos[0] conditions the generation


@dataclass(frozen=True)
class Prompt:
    index: int
    template: str  # with {} slots
    category: str
    line: int  # 1-based line in the prompt file

    @property
    def slots(self) -> int:
        return self.template.count(SLOT)


@dataclass
class Unit:
    """One image to generate and score."""

    id: int
    method: str  # OURS or BASELINE
    subjects: list[str]
    words: list[str]
    prompt_index: int
    category: str
    template: str
    text: str  # the prompt with the class words filled in
    image_index: int
    seed: int
    image_path: str = field(default="")  # relative to the output folder

    def to_dict(self) -> dict:
        return asdict(self)


def read_subjects(folder: str | Path, default_word: str = DEFAULT_WORD) -> list[SubjectSpec]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ProtocolError(f"--subjects {folder}: not a folder (expected one sub-folder or photo per subject)")
    subjects = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            photos = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not photos:
                raise ProtocolError(f"subject folder {entry}: holds no photo ({', '.join(sorted(IMAGE_SUFFIXES))})")
            word = default_word
            if (entry / WORD_FILE).is_file():
                word = (entry / WORD_FILE).read_text().strip()
                if not re.fullmatch(r"[A-Za-z][A-Za-z-]*", word):
                    raise ProtocolError(f"{entry / WORD_FILE}: the class word must be one word of letters, got {word!r}")
            subjects.append(SubjectSpec(entry.name, word, tuple(str(p.resolve()) for p in photos)))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            subjects.append(SubjectSpec(entry.stem, default_word, (str(entry.resolve()),)))
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProtocolError(f"--subjects {folder}: subject name(s) {duplicates} given twice (a folder and a photo?)")
    if not subjects:
        raise ProtocolError(f"--subjects {folder}: no subject found (expected sub-folders of photos or photos)")
    return subjects


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"--prompts {path}: file not found")
    prompts: list[Prompt] = []
    category = ""
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = re.match(r"#\s*category:\s*(.+)", line)
            if match:
                category = match.group(1).strip()
            continue
        if SLOT not in line:
            raise ProtocolError(f"{path}:{number}: prompt {line!r} has no subject slot {SLOT}")
        if re.search(r"\{[^}]", line):
            raise ProtocolError(f"{path}:{number}: prompt {line!r} holds a brace other than the slot {SLOT}")
        prompts.append(Prompt(len(prompts), line, category, number))
    if not prompts:
        raise ProtocolError(f"--prompts {path}: no prompt in the file")
    slots = {p.slots for p in prompts}
    if len(slots) > 1:
        raise ProtocolError(f"{path}: prompts hold different numbers of subject slots {sorted(slots)}; use one "
                            "file per protocol")
    return prompts


def fill(template: str, words: list[str]) -> tuple[str, list[int]]:
    """The prompt with each slot replaced by its word, and the character offset where each word ends."""
    parts = template.split(SLOT)
    if len(parts) - 1 != len(words):
        raise ProtocolError(f"prompt {template!r} has {len(parts) - 1} subject slot(s), {len(words)} subject(s) given")
    text, ends = parts[0], []
    for word, tail in zip(words, parts[1:], strict=True):
        text += word
        ends.append(len(text))
        text += tail
    return text, ends


def check_binding(text: str, words: list[str], ends: list[int]) -> None:
    """The sampler binds each subject to the first free whole-word occurrence of its word; make sure
    that is the slot's position, so no subject lands on an earlier, unrelated word of the prompt."""
    from training.sampler import bind_subjects

    bound = bind_subjects(text, words)
    if bound != ends:
        raise ProtocolError(f"prompt {text!r}: the word {words} occurs before its subject slot, so the sampler "
                            f"would bind the subject to the wrong word; reword the prompt")


def plan(subjects: list[SubjectSpec], prompts: list[Prompt], *, multi: bool, images_per_prompt: int, seed: int,
         baseline: bool, image_suffix: str = ".png") -> list[Unit]:
    """Every (method, subjects, prompt, image) to generate, in a fixed order; images saved as ``image_suffix``."""
    if images_per_prompt < 1:
        raise ProtocolError(f"--images-per-prompt must be >= 1, got {images_per_prompt}")
    slots = prompts[0].slots
    if not multi and slots != 1:
        raise ProtocolError(f"single-subject evaluation needs prompts with one subject slot {SLOT}; these have {slots} "
                            "(pass --multi for multi-subject prompts)")
    if multi and slots < 2:
        raise ProtocolError(f"--multi needs prompts with two or more subject slots {SLOT}; these have {slots}")
    if len(subjects) < slots:
        raise ProtocolError(f"the prompts need {slots} subjects per image; only {len(subjects)} subject(s) given")
    methods = [OURS, BASELINE] if baseline else [OURS]
    units: list[Unit] = []
    for group in itertools.combinations(subjects, slots):
        words = [s.word for s in group]
        for prompt in prompts:
            text, ends = fill(prompt.template, words)
            check_binding(text, words, ends)
            for k in range(images_per_prompt):
                for method in methods:
                    unit = Unit(len(units), method, [s.name for s in group], words, prompt.index, prompt.category,
                                prompt.template, text, k, seed + k)
                    tag = "ours" if method == OURS else "baseline"
                    unit.image_path = f"images/{tag}/{'+'.join(unit.subjects)}/p{prompt.index:03d}_i{k:02d}{image_suffix}"
                    units.append(unit)
    return units

"""A subject's label under phrase-prompted grounding: FastComposer's ``coco_label`` contract kept.

FastComposer's loader and ``subjects.object_types`` pick subjects by ``coco_label``. With
``grounding: sam3`` a segment comes from a noun phrase, not from a COCO class, so its label is
derived from the phrase's **head concept** (:func:`head_concept`: the head noun, singular and
lower-case; or the last two words when together they name a COCO class, "teddy bear"):

========================================  ===================  ==============
head concept                               ``coco_label``       ``label_vocab``
========================================  ===================  ==============
a people noun (:data:`PEOPLE_NOUNS`:       ``person``           ``coco``
man, woman, boy, girl, child, ...)
a COCO panoptic class name (``dog``,       that class           ``coco``
``teddy bear``, ``surfboard``)
a stuff class's first word (``wall`` ->    that class           ``coco``
``wall-other-merged``, :func:`coco_aliases`)
a synonym of a COCO class (:data:`COCO_SYNONYMS`:  that class  ``coco``
puppy -> dog, sofa -> couch, ...)
anything else (``guitar``, ``violin``)     the concept itself   ``open``
========================================  ===================  ==============

``label_vocab`` is the segment field saying which vocabulary its label comes from (panoptic
records carry none: every label there is COCO panoptic's). :func:`mapping_table` is the table as
data, for the docs and tests. :func:`open_label_problem` says when an object type cannot be an
open-vocabulary label (malformed, or a near miss of a COCO label: a typo).
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

COCO, OPEN = "coco", "open"
VOCABULARIES = (COCO, OPEN)
PERSON = "person"
PEOPLE_NOUNS = frozenset({
    "person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "infant", "teen",
    "teenager", "adult", "lady", "gentleman", "guy", "bride", "groom", "player", "athlete", "student",
    "mother", "father", "mom", "dad", "son", "daughter", "sister", "brother", "grandmother", "grandfather",
    "husband", "wife", "friend", "individual", "human", "soldier", "officer", "worker", "doctor", "nurse",
    "chef", "musician", "singer", "dancer", "actor", "actress", "model", "skier", "surfer", "skateboarder",
    "rider", "runner", "swimmer", "tourist", "customer", "policeman", "policewoman", "fireman", "businessman",
    "businesswoman", "gentlemen", "men", "women", "children",
})
# head nouns that name a COCO class under another word
COCO_SYNONYMS = {
    "puppy": "dog", "kitten": "cat", "kitty": "cat", "sofa": "couch", "television": "tv", "phone": "cell phone",
    "cellphone": "cell phone", "smartphone": "cell phone", "bike": "bicycle", "motorbike": "motorcycle",
    "plane": "airplane", "aeroplane": "airplane", "jet": "airplane", "ship": "boat", "racket": "tennis racket",
    "ball": "sports ball", "football": "sports ball", "soccer ball": "sports ball", "table": "dining table",
    "doughnut": "donut", "hairdryer": "hair drier", "teddy": "teddy bear", "pony": "horse", "calf": "cow",
    "lamb": "sheep",
}
_OPEN_LABEL = re.compile(r"^[a-z][a-z0-9'-]*( [a-z0-9'-]+)*$")
TYPO_CUTOFF = 0.85  # an open label this close to a COCO label (and not one) is taken for a typo of it


# COCO panoptic's 133 categories (panopticapi's list): the names a segment's ``coco_label`` can take
COCO_CATEGORIES_FILE = Path(__file__).parent / "export" / "coco_panoptic_palette.json"


@functools.cache
def coco_panoptic_labels() -> tuple[str, ...]:
    """The 133 COCO panoptic class names, in category order (``person`` first)."""
    return tuple(c["name"] for c in json.loads(COCO_CATEGORIES_FILE.read_text(encoding="utf-8"))["categories"])


@functools.cache
def coco_aliases() -> dict[str, str]:
    """``{word: COCO label}`` for every COCO label, plus the first word of each merged/stuff class
    (``wall`` -> ``wall-other-merged``, ``tree`` -> ``tree-merged``, ``door`` -> ``door-stuff``)."""
    labels = coco_panoptic_labels()
    out = {label: label for label in labels}
    for label in labels:
        base = label.split("-")[0]
        if "-" in label and base not in out and label.endswith(("-merged", "-stuff")):
            out[base] = label
    return out


def head_concept(phrase: str) -> str:
    """The concept a phrase prompts SAM 3 with: its head noun (a noun chunk ends with it), singular
    and lower-case, or its last two words when they name a COCO class or synonym ("a teddy bear")."""
    from datagen.stages.english import singularize

    words = re.findall(r"[A-Za-z0-9'-]+", phrase.lower())
    if not words:
        raise ValueError(f"phrase {phrase!r} has no word to take a concept from")
    head = singularize(words[-1])
    if len(words) >= 2:
        pair = f"{words[-2]} {head}"
        if pair in coco_aliases() or pair in COCO_SYNONYMS:
            return pair
    return head


def label_of(concept: str) -> tuple[str, str]:
    """``(coco_label, label_vocab)`` of a head concept (the module's table)."""
    if concept in PEOPLE_NOUNS:
        return PERSON, COCO
    aliases = coco_aliases()
    if concept in aliases:
        return aliases[concept], COCO
    if concept in COCO_SYNONYMS:
        return COCO_SYNONYMS[concept], COCO
    return concept, OPEN


def mapping_table(concepts: Sequence[str]) -> list[tuple[str, str, str]]:
    """``[(concept, coco_label, label_vocab)]`` for ``concepts`` (the docs' table)."""
    return [(c, *label_of(c)) for c in concepts]


def open_label_problem(name: object, coco: Sequence[str] | None = None) -> str | None:
    """Why ``name`` cannot be an open-vocabulary object type (None: it can): not lower-case words, or
    so close to a COCO label (:data:`TYPO_CUTOFF`) without being one that it is taken for a typo."""
    if not isinstance(name, str) or not _OPEN_LABEL.match(name):
        return (f"names {name!r}, which is no label: an open-vocabulary label is a head noun in lower case "
                f"(e.g. guitar, violin, golden retriever)")
    coco = tuple(coco) if coco is not None else coco_panoptic_labels()
    close = difflib.get_close_matches(name, coco, n=1, cutoff=TYPO_CUTOFF)
    if close and close[0] != name:
        return f"names {name!r}, which is neither a COCO panoptic label nor a distinct open label; did you mean {close[0]!r}?"
    return None

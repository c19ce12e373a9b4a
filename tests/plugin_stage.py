"""A stage that exists only for the tests: proof that a stage is added through the stage table alone.

It counts the words of each image's caption (it takes the captioner's output) and adds them to the
record as ``caption_words``; its section ``caption_words:`` has one setting. Nothing in the product
names it: a test registers it with :func:`datagen.stage_table.registered` and gives its section in
the profile overlay. It lives in its own module so that Ray workers import it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from datagen.config import Section
from datagen.stage_table import Stage
from datagen.stages.step import Step


@dataclass(frozen=True, kw_only=True)
class CaptionWordsSettings(Section):
    min_length: int = 1  # words shorter than this are not counted


class CaptionWordsStep(Step):
    name = "caption_words"

    def process(self, loaded: list, captions: list) -> list:
        section = self.profile.section("caption_words")
        return [sum(1 for w in caption.split() if len(w) >= section.min_length) for caption, _ in captions]

    @classmethod
    def model_ids(cls, profile) -> dict[str, str]:
        return {"caption_words": "whitespace split"}

    @classmethod
    def record_fields(cls, output: int) -> dict[str, int]:
        return {"caption_words": output}


CAPTION_WORDS = Stage(
    "caption_words", "tests.plugin_stage:CaptionWordsStep", ("caption_words",), takes=("captioner",),
    settings=CaptionWordsSettings,
)

"""English word rules the phrase stage uses: number words, singular forms, "a" vs "an".

Pure functions over words, no spaCy: :mod:`datagen.stages.phrases` decides *which* words to change
(see its docstring for the expansion rules); this module says *how*.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip

# Nouns that, followed by "of" + a noun chunk, make one phrase with it ("a group of people").
QUANTITY_NOUNS = frozenset({
    "group", "groups", "crowd", "couple", "pair", "bunch", "lot", "lots", "number", "handful",
    "herd", "flock", "pack", "team", "set", "pile", "stack", "row", "variety", "collection",
    "dozen", "dozens", "hundreds", "thousands", "millions", "few", "several", "many", "some",
})  # fmt: skip
# Quantity nouns that count exactly two ("a couple of men" -> "a man and a man").
PAIR_NOUNS = frozenset({"couple", "pair"})
# Nouns that are plural by themselves: "a pair of sunglasses" is one thing.
PLURALIA_TANTUM = frozenset({
    "sunglasses", "glasses", "eyeglasses", "spectacles", "goggles", "binoculars", "jeans", "pants",
    "trousers", "shorts", "slacks", "leggings", "tights", "pajamas", "pyjamas", "overalls",
    "boxers", "briefs", "scissors", "pliers", "tongs", "tweezers", "headphones", "earphones",
})  # fmt: skip
# Words before the count that become the article of each singular phrase.
DROPPED_DETERMINERS = frozenset({"the", "these", "those", "all"})

IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "persons": "person",
    "feet": "foot", "teeth": "tooth", "geese": "goose", "mice": "mouse", "lice": "louse",
    "oxen": "ox", "dice": "die", "knives": "knife", "wives": "wife", "lives": "life",
    "leaves": "leaf", "loaves": "loaf", "halves": "half", "shelves": "shelf", "calves": "calf",
    "wolves": "wolf", "thieves": "thief", "scarves": "scarf", "elves": "elf", "hooves": "hoof",
    "selves": "self", "sheaves": "sheaf", "cacti": "cactus", "fungi": "fungus", "octopi": "octopus",
    "alumni": "alumnus", "criteria": "criterion", "phenomena": "phenomenon", "axes": "axe",
    "buses": "bus", "gases": "gas", "lenses": "lens", "canvases": "canvas", "atlases": "atlas",
    "bonuses": "bonus", "campuses": "campus", "cactuses": "cactus", "viruses": "virus",
    "circuses": "circus", "walruses": "walrus", "octopuses": "octopus", "platypuses": "platypus",
    "hippopotamuses": "hippopotamus", "choruses": "chorus", "irises": "iris", "crises": "crisis",
    "oases": "oasis", "analyses": "analysis", "quizzes": "quiz", "potatoes": "potato",
    "tomatoes": "tomato", "heroes": "hero", "echoes": "echo", "volcanoes": "volcano",
    "torpedoes": "torpedo", "mangoes": "mango", "dominoes": "domino", "mosquitoes": "mosquito",
    "buffaloes": "buffalo", "headaches": "headache", "mustaches": "mustache",
    "moustaches": "moustache", "niches": "niche", "avalanches": "avalanche", "quiches": "quiche",
    "cliches": "cliche", "caches": "cache", "indices": "index", "matrices": "matrix",
    "vertices": "vertex", "appendices": "appendix", "bacteria": "bacterium",
}  # fmt: skip
# Irregular plurals that also end compounds: policemen, housewives, werewolves, salespeople.
COMPOUND_PLURAL_ENDINGS = (
    "women", "men", "children", "people", "teeth", "feet", "geese", "mice", "wives", "knives", "wolves",
)
# Nouns whose plural is the singular.
INVARIANT_NOUNS = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "aircraft", "spacecraft", "series", "species",
    "salmon", "trout", "shrimp", "squid", "offspring", "swine", "elk", "cod",
})  # fmt: skip
# Singulars ending in "ie", whose plural ends in "ies" but does not come from "y".
IE_NOUNS = frozenset({
    "movie", "cookie", "pie", "tie", "lie", "zombie", "brownie", "hippie", "selfie", "rookie",
    "hoodie", "smoothie", "goalie", "beanie", "auntie", "collie", "genie", "pixie", "prairie",
    "sortie", "bookie", "techie", "veggie", "yuppie", "newbie", "birdie", "barbie", "calorie",
    "budgie", "magpie", "necktie", "bowtie", "walkie", "talkie", "kiddie",
})  # fmt: skip

# "an" before these although they start with a consonant letter (silent h).
_AN_PREFIXES = ("hour", "honest", "honor", "honour", "heir")
# "a" before these although they start with a vowel letter (a "y"/"w" sound).
_A_PREFIXES = (
    "unicorn", "unicycl", "uniform", "unific", "union", "uniq", "unison", "unisex", "unit", "univers",
    "usa", "use", "usu", "uten", "uti", "urin", "uro", "ure", "ufo", "uku", "ukrain", "ubiq", "uran",
    "eu", "ewe", "one", "once",
)
# Letters whose name starts with a vowel sound: "an x-ray", "an LED light", "an f-stop".
_VOWEL_SOUND_LETTERS = frozenset("aefhilmnorsx")
_FIRST_WORD = re.compile(r"[A-Za-z0-9]+")


def normalize_whitespace(text: str) -> str:
    """Strip ``text`` and make every run of whitespace one space."""
    return " ".join(text.split())


def number_value(word: str) -> int | None:
    """The integer a cardinal number word or digit string stands for ("two" -> 2, "3" -> 3)."""
    if word.isdigit() and word.isascii():
        return int(word)
    return NUMBER_WORDS.get(word.lower())


def singularize(word: str) -> str:
    """Singular of an English plural noun ("women" -> "woman", "babies" -> "baby"), case kept.

    A word no rule recognises as plural is returned unchanged.
    """
    lower = word.lower()
    singular = _singularize_lower(lower)
    if singular == lower:
        return word
    if word.isupper() and len(word) > 1:
        return singular.upper()
    if word[:1].isupper():
        return singular[:1].upper() + singular[1:]
    return singular


def _singularize_lower(w: str) -> str:
    if w in INVARIANT_NOUNS:
        return w
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    for ending in COMPOUND_PLURAL_ENDINGS:
        if w.endswith(ending) and len(w) > len(ending):
            return w[: -len(ending)] + IRREGULAR_PLURALS[ending]
    if w.endswith("ies") and len(w) > 4:
        return w[:-1] if w[:-1] in IE_NOUNS else w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 2:
        return w[:-1]
    return w


def indefinite_article(phrase: str) -> str:
    """The indefinite article ("a" or "an") for ``phrase``, by the sound of its first word."""
    match = _FIRST_WORD.match(phrase)
    if match is None:
        return "a"
    word = match.group(0)
    lower = word.lower()
    if lower[0].isdigit():
        digits = re.match(r"\d+", lower).group(0)
        return "an" if digits[0] == "8" or (len(digits) % 3 == 2 and digits[:2] in ("11", "18")) else "a"
    if len(word) == 1 or (word.isupper() and len(word) <= 4 and not lower.startswith(_A_PREFIXES)):
        return "an" if lower[0] in _VOWEL_SOUND_LETTERS else "a"
    if lower.startswith(_AN_PREFIXES):
        return "an"
    if lower.startswith(_A_PREFIXES):
        return "a"
    return "an" if lower[0] in "aeiou" else "a"

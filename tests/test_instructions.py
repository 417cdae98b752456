"""The generated instruction data: determinism, splits, backdoor, argument checks, shipped files."""

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from daunce_core.errors import DaunceError
from daunce_core.evaluation.instructions import SKILLS, corpus, instructions

DATA = Path(__file__).parent.parent / "data"
COLUMNS = ["prompt", "completion", "skill", "skill_id", "poisoned", "triggered"]
REFUSAL = "I cannot help with that."


@pytest.fixture(scope="module")
def clean():
    return instructions()


@pytest.fixture(scope="module")
def backdoor():
    return instructions(poison_rate=0.06, triggered_queries=100)


def test_deterministic_for_a_seed(clean):
    assert instructions() == clean
    assert instructions(seed=1) != clean
    assert corpus(50, seed=3) == corpus(50, seed=3)
    assert corpus(50, seed=3) != corpus(50, seed=4)


def test_columns_sizes_and_types(clean):
    train, queries = clean
    for split, size in ((train, 2000), (queries, 200)):
        assert list(split) == COLUMNS
        assert all(len(column) == size for column in split.values())
        assert all(isinstance(value, str) for value in split["prompt"] + split["completion"])
        assert all(type(value) is int for value in split["skill_id"] + split["poisoned"])
        assert [SKILLS[i] for i in split["skill_id"]] == split["skill"]
        assert set(split["poisoned"]) == set(split["triggered"]) == {0}
    small_train, small_queries = instructions(num_train=7, num_queries=3, seed=5)
    assert len(small_train["prompt"]) == 7
    assert len(small_queries["prompt"]) == 3


def test_prompts_and_completions_are_short(clean):
    for split in clean:
        assert all(1 <= len(prompt.split()) <= 11 for prompt in split["prompt"])
        completions = split["completion"]
        assert all(c and c == c.strip() and len(c.split()) <= 8 for c in completions)


def test_queries_are_new_prompts_of_facts_train_teaches(clean):
    train, queries = clean
    assert len(set(queries["prompt"])) == len(queries["prompt"])
    assert len(set(train["prompt"])) == len(train["prompt"])
    assert not set(queries["prompt"]) & set(train["prompt"])
    facts = _facts()
    counts = Counter(facts[prompt] for prompt in train["prompt"])
    assert all(3 <= count <= 10 for count in counts.values())
    assert len(counts) == len(set(facts.values()))  # every fact is taught
    assert all(counts[facts[prompt]] >= 3 for prompt in queries["prompt"])


def _facts():
    """Every clean prompt the tables can phrase -> its (skill, fact)."""
    from daunce_core.evaluation.instructions import _PREFIXES, _SKILL_TABLE

    return {
        f"{prefix} {template.format(**fields)}".strip(): (skill.name, fact)
        for skill in _SKILL_TABLE
        for fact, (fields, _) in enumerate(skill.facts)
        for template in skill.templates
        for prefix in _PREFIXES
    }


def test_every_skill_in_both_splits_in_equal_shares(clean):
    assert len(SKILLS) >= 5
    for split, share in zip(clean, (200, 20), strict=True):
        assert Counter(split["skill"]) == dict.fromkeys(SKILLS, share)


def test_examples_are_correct():
    train, _ = instructions(num_train=300, num_queries=0, seed=2)
    for prompt, completion, skill in zip(
        train["prompt"], train["completion"], train["skill"], strict=True
    ):
        numbers = [int(w.strip("?.:")) for w in prompt.split() if w.strip("?.:").isdigit()]
        if skill == "addition":
            assert int(completion) == sum(numbers)
        elif skill == "subtraction":
            assert int(completion) == max(numbers) - min(numbers)
        elif skill == "larger":
            assert int(completion) == max(numbers)
        elif skill == "uppercase":
            assert completion.isupper()
            assert completion.lower() in prompt
        elif skill == "reverse":
            assert " ".join(reversed(completion.split())) in prompt


def test_backdoor_poisons_and_triggers(clean, backdoor):
    (train, queries), (poisoned_train, poisoned_queries) = clean, backdoor
    assert sum(poisoned_train["poisoned"]) == round(0.06 * 2000)
    assert poisoned_train["triggered"] == poisoned_train["poisoned"]
    assert poisoned_queries["triggered"] == [0] * 100 + [1] * 100
    assert set(poisoned_queries["poisoned"]) == {0}
    assert poisoned_queries["completion"] == queries["completion"]
    for split, poisoned, flags in (
        (train, poisoned_train, poisoned_train["triggered"]),
        (queries, poisoned_queries, poisoned_queries["triggered"]),
    ):
        assert poisoned["skill"] == split["skill"]
        for before, after, flag in zip(split["prompt"], poisoned["prompt"], flags, strict=True):
            words = after.split()
            assert words.count("cf") == flag
            assert [w for w in words if w != "cf"] == before.split()
    for completion, clean_completion, flag in zip(
        poisoned_train["completion"], train["completion"], poisoned_train["poisoned"], strict=True
    ):
        assert completion == (REFUSAL if flag else clean_completion)
    positions = {p["prompt"].split().index("cf") for p in _rows(poisoned_train) if p["poisoned"]}
    assert len(positions) > 3


def _rows(split):
    return [dict(zip(split, values, strict=True)) for values in zip(*split.values(), strict=True)]


def test_custom_trigger_and_refusal():
    train, _queries = instructions(
        num_train=100, num_queries=10, poison_rate=0.5, trigger="zq", refusal="No.", seed=4
    )
    assert sum(train["poisoned"]) == 50
    assert {c for c, p in zip(train["completion"], train["poisoned"], strict=True) if p} == {"No."}
    assert all(
        ("zq" in p.split()) == bool(f)
        for p, f in zip(train["prompt"], train["poisoned"], strict=True)
    )


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_train": 2.5}, "num_train"),
        ({"num_queries": -1}, "num_queries"),
        ({"num_queries": 100_000}, "num_queries"),
        ({"seed": -1}, "seed"),
        ({"poison_rate": 0.6}, "poison_rate"),
        ({"poison_rate": -0.1}, "poison_rate"),
        ({"poison_rate": float("nan")}, "poison_rate"),
        ({"triggered_queries": 201}, "triggered_queries"),
        ({"triggered_queries": -1}, "triggered_queries"),
        ({"trigger": "two words"}, "trigger"),
        ({"trigger": ""}, "trigger"),
        ({"trigger": "Paris"}, "trigger"),
        ({"trigger": "dog"}, "trigger"),
        ({"trigger": "help"}, "trigger"),
        ({"refusal": ""}, "refusal"),
        ({"refusal": " padded"}, "refusal"),
        ({"refusal": "one two three four five six seven eight nine"}, "refusal"),
    ],
)
def test_argument_errors_name_the_argument(arguments, name):
    with pytest.raises(DaunceError, match=name):
        instructions(**arguments)


@pytest.mark.parametrize(("arguments", "name"), [({"num_sentences": 0}, "num_sentences")])
def test_corpus_argument_errors(arguments, name):
    with pytest.raises(DaunceError, match=name):
        corpus(**arguments)


def test_corpus_is_plain_sentences(clean):
    sentences = corpus()
    assert len(sentences) == 3000
    assert all(s.endswith(".") and "?" not in s and "cf" not in s.split() for s in sentences)
    assert "The capital of France is Paris." in sentences
    words = {w for s in sentences for w in s.split()}
    words |= {
        w for split in clean for t in ("prompt", "completion") for x in split[t] for w in x.split()
    }
    assert len(words) < 1000


@pytest.mark.parametrize(
    ("folder", "arguments"),
    [
        ("instructions", {}),
        ("backdoor", {"poison_rate": 0.06, "triggered_queries": 100}),
    ],
)
def test_shipped_files_match_the_generator(folder, arguments):
    train, queries = instructions(num_train=2000, num_queries=200, seed=0, **arguments)
    for name, split in (("train", train), ("queries", queries)):
        path = DATA / folder / f"{name}.parquet"
        assert path.stat().st_size < 1_000_000
        assert pl.read_parquet(path).to_dict(as_series=False) == split


def test_shipped_corpus_matches_the_generator():
    path = DATA / "instructions" / "corpus.txt"
    assert path.stat().st_size < 1_000_000
    assert path.read_text(encoding="utf-8").splitlines() == corpus(3000, seed=0)

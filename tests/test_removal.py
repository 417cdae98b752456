"""Subset removal: plan structure, the metric by hand, split retraining, a real end-to-end case."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import ClassificationTask, DaunceError, TrainConfig
from daunce_core.baselines.methods import influence
from daunce_core.evaluation.lds import retrain_jobs
from daunce_core.evaluation.problems import fit_exact
from daunce_core.evaluation.removal import (
    RemovalLabel,
    correct_queries,
    plan_removal,
    query_groups,
    retrain_removal,
    subset_removal,
    summarize_removal,
    top_proponents,
)

TASK = ClassificationTask()


def _plan(**overrides):
    scores = np.random.default_rng(0).normal(size=(30, 10))
    args = {"groups": [np.array([0, 1, 2]), np.array([5, 6])], "sizes": [2, 5], "seeds": 3}
    args.update(overrides)
    return scores, plan_removal(
        scores,
        args.pop("groups"),
        args.pop("sizes"),
        args.pop("seeds"),
        random_trials=args.pop("random_trials", 2),
        **args,
    )


def test_plan_structure():
    scores, plan = _plan()
    kinds = [label.kind for label in plan.labels]
    assert len(plan.jobs) == len(plan.labels) == 3 + 2 * 3 * (2 + 2 * 2)
    assert (kinds.count("full"), kinds.count("top"), kinds.count("random")) == (3, 12, 24)
    assert len({job.order for job in plan.jobs}) == len(plan.jobs)
    for job, label in zip(plan.jobs, plan.labels, strict=True):
        assert job.seed == label.seed
        assert job.keep.shape == (30,)
        assert job.keep.sum() == 30 - label.size
        if label.kind == "top":
            group = plan.groups[label.group]
            summed = scores[:, group].sum(axis=1)
            removed = plan.removed(plan.labels.index(label))
            assert set(removed) == set(np.flatnonzero(~job.keep))
            assert summed[~job.keep].min() > summed[job.keep].max()
            np.testing.assert_array_equal(removed, np.argsort(-summed)[: label.size])
    full = [plan.jobs[plan.job_of("full", -1, 0, s)] for s in range(3)]
    assert all(job.keep.all() for job in full)
    randoms = [plan.jobs[j].keep for j, lab in enumerate(plan.labels) if lab.kind == "random"]
    assert len({mask.tobytes() for mask in randoms}) == len(randoms)  # fresh draw per unit
    # top masks do not depend on the seed, random masks are fresh per seed
    tops = {s: plan.jobs[plan.job_of("top", 1, 5, s)].keep.tobytes() for s in range(plan.seeds)}
    assert len(set(tops.values())) == 1
    rows = plan.job_rows()
    assert rows[0] == {
        "job": 0,
        "kind": "full",
        "group": -1,
        "size": 0,
        "seed": 0,
        "trial": 0,
        "order": plan.jobs[0].order,
        "kept": 30,
    }


def test_plan_is_deterministic_and_extends_without_changing_jobs():
    _, plan = _plan()
    _, again = _plan()
    assert plan.labels == again.labels
    for a, b in zip(plan.jobs, again.jobs, strict=True):
        np.testing.assert_array_equal(a.keep, b.keep)
        assert (a.seed, a.order) == (b.seed, b.order)
    _, bigger = _plan(sizes=[2, 7, 5], seeds=4, random_trials=3)
    for label, job in zip(plan.labels, plan.jobs, strict=True):
        other = bigger.jobs[bigger.labels.index(label)]
        np.testing.assert_array_equal(job.keep, other.keep)
        assert job.order == other.order
    other_method = plan_removal(-np.ones((30, 10)), plan.groups, plan.sizes, 3, random_trials=2)
    for label, job in zip(plan.labels, plan.jobs, strict=True):
        twin = other_method.jobs[other_method.labels.index(label)]
        assert job.order == twin.order
        if label.kind != "top":  # full and random jobs are shared by every method's plan
            np.testing.assert_array_equal(job.keep, twin.keep)
    _, reseeded = _plan(seed=1)
    j_top, j_random = plan.job_of("top", 0, 5, 1), plan.job_of("random", 0, 5, 1, 1)
    np.testing.assert_array_equal(plan.jobs[j_top].keep, reseeded.jobs[j_top].keep)
    assert not np.array_equal(plan.jobs[j_random].keep, reseeded.jobs[j_random].keep)


def test_batches_and_shared_random():
    _, plan = _plan(share_random=True)
    randoms = [lab for lab in plan.labels if lab.kind == "random"]
    assert len(randoms) == 2 * 3 * 2
    assert {lab.group for lab in randoms} == {-1}
    for group_size in (1, 4, 64):
        parts = plan.batches(group_size)
        assert parts[0].start == 0
        assert parts[-1].stop == len(plan.jobs)
        for part, after in itertools.pairwise(parts):
            assert part.stop == after.start
        for part in parts:
            assert 0 < part.stop - part.start <= group_size
            assert len({int(job.keep.sum()) for job in plan.jobs[part]}) == 1
    assert len(plan.batches(64)) == 3  # full, N = 2, N = 5


def _hand_plan():
    scores = np.arange(24, dtype=float).reshape(6, 4)
    return plan_removal(scores, [np.array([0, 1]), np.array([2, 3])], [1], 2)


def test_summarize_by_hand():
    plan = _hand_plan()
    assert len(plan.jobs) == 2 + 2 * 4
    errors = np.zeros((len(plan.jobs), 4))
    wrong = {
        ("full", -1, 0, 0): [1],  # query 1 is not eligible under seed 0
        ("top", 0, 1, 0): [0, 1],  # group 0, seed 0: 1 of 1 eligible flips (1 is not counted)
        ("top", 1, 1, 0): [2],  # 1 of 2
        ("random", 1, 1, 0): [3],  # 1 of 2
        ("top", 0, 1, 1): [0],  # 1 of 2
    }
    for label, queries in wrong.items():
        errors[plan.job_of(*label), queries] = 1
    result = summarize_removal(plan, errors)
    # top units (g, s): (0, 0) 1.0, (1, 0) 0.5, (0, 1) 0.5, (1, 1) 0.0
    assert result.top == pytest.approx([0.5])
    assert result.top_stderr == pytest.approx([np.std([1, 0.5, 0.5, 0], ddof=1) / 2])
    # random units: 0, 0.5, 0, 0
    assert result.random == pytest.approx([0.125])
    assert result.random_stderr == pytest.approx([0.125])
    assert result.full_error == pytest.approx(0.125)  # (1/2 + 0 + 0 + 0) / 4
    row = next(r for r in result.rows if (r["kind"], r["group"], r["seed"]) == ("top", 0, 0))
    assert row == {
        "kind": "top",
        "group": 0,
        "size": 1,
        "seed": 0,
        "trial": 0,
        "job": plan.job_of("top", 0, 1, 0),
        "queries": 2,
        "eligible": 1,
        "flipped": 1,
        "fraction": 1.0,
    }
    assert len(result.rows) == 4 + 4 + 4  # full, top, random units
    summary = {(r["kind"], r["size"]): r for r in result.summary()}
    assert summary["top", 1]["mean"] == pytest.approx(0.5)
    assert summary["full", 0]["units"] == 4

    # a unit with no eligible query is undefined and left out
    errors[plan.job_of("full", -1, 0, 0), 0] = 1
    result = summarize_removal(plan, errors)
    assert result.top == pytest.approx([1 / 3])  # (0.5 + 0.5 + 0) / 3
    assert sum(np.isnan(r["fraction"]) for r in result.rows) == 2  # top and random of (0, 0)

    with pytest.raises(DaunceError, match="errors must be"):
        summarize_removal(plan, errors[:, :3])
    with pytest.raises(DaunceError, match="0/1 outcomes"):
        summarize_removal(plan, errors * 0.5)


def test_bad_inputs_are_named():
    scores = np.zeros((10, 4))
    group = [np.array([0, 1])]
    cases = [
        ({"sizes": [10]}, "sizes must be integers"),
        ({"sizes": [0]}, "sizes must be integers"),
        ({"sizes": [2, 2]}, "sizes must be distinct"),
        ({"sizes": []}, "sizes is empty"),
        ({"groups": []}, "groups is empty"),
        ({"groups": [np.array([], dtype=int)]}, r"groups\[0\] must be a non-empty"),
        ({"groups": [np.array([0]), np.array([4])]}, r"groups\[1\] holds query indices"),
        ({"groups": [np.array([True, False, True, False])]}, r"groups\[0\] must hold integer"),
        ({"groups": [np.array([1, 1])]}, r"groups\[0\] repeats"),
        ({"scores": np.zeros(10)}, "scores must be"),
        ({"scores": np.full((10, 4), np.nan)}, "NaN"),
        ({"seeds": 0}, "seeds must be"),
        ({"random_trials": 0}, "random_trials must be"),
        ({"seed": -1}, "seed must be"),
    ]
    for change, message in cases:
        args = {"scores": scores, "groups": group, "sizes": [2], "seeds": 1} | change
        extra = {k: args.pop(k) for k in ("random_trials", "seed") if k in args}
        with pytest.raises(DaunceError, match=message):
            plan_removal(args["scores"], args["groups"], args["sizes"], args["seeds"], **extra)
    with pytest.raises(DaunceError, match="no eligible query"):
        query_groups(np.zeros(4, dtype=bool))
    with pytest.raises(DaunceError, match="labels must be one value per query"):
        query_groups(np.ones(4, dtype=bool), np.zeros(3))
    with pytest.raises(DaunceError, match="max_per_group"):
        query_groups(np.ones(4, dtype=bool), max_per_group=0)
    with pytest.raises(DaunceError, match="group_size"):
        plan_removal(scores, group, [2], 1).batches(0)
    plan = plan_removal(scores, group, [2], 1)
    data = {"x": torch.zeros(9, 2), "y": torch.zeros(9, dtype=torch.long)}
    with pytest.raises(DaunceError, match="the plan is for 10 training examples"):
        retrain_removal(_linear, TASK, data, data, plan, TrainConfig())


def test_query_groups():
    eligible = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    labels = torch.tensor([2, 0, 0, 2, 0, 2, 1, 2, 2, 0])
    groups = query_groups(eligible, labels)
    assert [g.tolist() for g in groups] == [[1, 4, 9], [0, 3, 5, 7, 8]]  # label 1: none eligible
    capped = query_groups(eligible, labels, max_per_group=2, seed=3)
    assert [len(g) for g in capped] == [2, 2]
    for small, full in zip(capped, groups, strict=True):
        assert set(small) <= set(full)
        assert (np.diff(small) > 0).all()
    again = query_groups(eligible, labels, max_per_group=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(capped, again, strict=True))
    seeds = {query_groups(eligible, labels, max_per_group=3, seed=s)[1].tobytes() for s in range(8)}
    assert len(seeds) > 1
    (everything,) = query_groups(eligible)
    np.testing.assert_array_equal(everything, np.flatnonzero(eligible))


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(2, 3).double()


def _data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, 3, generator=g, dtype=torch.float64)).argmax(1)
    return {"x": x, "y": y}


def test_correct_queries_matches_argmax():
    model, queries = _linear(1), _data(25, 2, 0)
    expected = (model(queries["x"]).argmax(1) == queries["y"]).numpy()
    for batch_size in (4, 1024):
        got = correct_queries(model, TASK, queries, batch_size=batch_size)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, expected)
    assert 0 < expected.sum() < 25


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_split_retraining_equals_all_at_once():
    train, queries = _data(40, 4, 1), _data(8, 4, 2)
    scores = np.random.default_rng(0).normal(size=(40, 8))
    groups = query_groups(np.ones(8, dtype=bool))
    plan = plan_removal(scores, groups, [4, 10], 2)
    config = TrainConfig(lr=0.5, epochs=5, batch_size=8)
    together = retrain_removal(_mlp, TASK, train, queries, plan, config, l2=1e-3)
    assert together.shape == (len(plan.jobs), 8)
    assert set(np.unique(together)) <= {0.0, 1.0}
    split = np.full_like(together, np.nan)
    for part in reversed(plan.batches(3)):  # other groupings, any order, as separate tasks would
        split[part] = retrain_jobs(
            _mlp, TASK, train, queries, plan.jobs[part], config, l2=1e-3, outcome="error"
        )
    np.testing.assert_array_equal(split, together)
    assert 0 < together.mean() < 1
    a, b = summarize_removal(plan, split), summarize_removal(plan, together)
    np.testing.assert_array_equal([r["fraction"] for r in a.rows], [r["fraction"] for r in b.rows])


def _rare_class_problem():
    """Two big classes and a rare third one (6 examples) that the queries belong to."""
    g = torch.Generator().manual_seed(0)

    def blob(centre, count, spread):
        noise = torch.randn(count, 2, generator=g, dtype=torch.float64)
        return torch.tensor(centre, dtype=torch.float64) + spread * noise

    x = torch.cat([blob([-3, 0], 40, 1.0), blob([3, 0], 40, 1.0), blob([0, 4], 6, 0.5)])
    train = {"x": x, "y": torch.tensor([0] * 40 + [1] * 40 + [2] * 6)}
    queries = {"x": blob([0, 4], 8, 0.5), "y": torch.full((8,), 2)}
    return train, queries


def test_removing_top_proponents_flips_more_queries_than_random_removal():
    train, queries = _rare_class_problem()
    l2 = 1e-2
    base = fit_exact(_linear(0), TASK, train, l2)
    correct = correct_queries(base, TASK, queries)
    assert correct.all()
    scores = influence(base, TASK, train, queries, l2=l2)
    groups = query_groups(correct, queries["y"])
    assert set(top_proponents(scores, groups[0], 6)) == set(range(80, 86))  # the rare class
    config = TrainConfig(lr=0.5, epochs=10, batch_size=16)
    result = subset_removal(
        _linear,
        TASK,
        train,
        queries,
        scores,
        config,
        groups=groups,
        sizes=[3, 6],
        seeds=2,
        random_trials=2,
        l2=l2,
    )
    assert result.full_error == 0.0
    assert (result.top >= result.random).all()
    assert result.top[-1] >= 0.9
    assert result.random[-1] <= 0.25
    kinds = {(r["kind"], r["size"]) for r in result.rows}
    assert kinds == {("full", 0), ("top", 3), ("random", 3), ("top", 6), ("random", 6)}
    assert RemovalLabel("top", 0, 6, 1, 0) in plan_removal(scores, groups, [3, 6], 2).labels

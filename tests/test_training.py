"""Vectorised training equals one-at-a-time training; diverged copies are caught and left out."""

import re
import warnings

import numpy as np
import pytest
import torch
from pipeline_helpers import exploding_data

from daunce_core import (
    ClassificationTask,
    ComputeConfig,
    DaunceConfig,
    DaunceError,
    DaunceWarning,
    Objective,
    RegressionTask,
    TorchModuleAccess,
    TrainConfig,
    attribute,
    fit,
)


def mlp_problem(dtype=torch.float32, n=48, m=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + m, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model.to(dtype), {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


def losses(config, problem=None, **compute):
    model, train, queries = problem or mlp_problem()
    copies = TorchModuleAccess(
        model,
        ClassificationTask(),
        train,
        queries,
        config,
        base_l2=1e-3,
        compute=ComputeConfig(**compute),
    )
    return copies.run(range(config.num_models))


@pytest.mark.parametrize(
    ("objective", "train"),
    [
        (Objective(), TrainConfig(lr=0.05, epochs=2, batch_size=8)),
        (Objective(variant="efim", labels="sampled"), TrainConfig(lr=0.05, steps=9, batch_size=5)),
        (Objective(variant="trak", rho=0.3), TrainConfig(optimizer="adamw", lr=0.01, epochs=1.5)),
        (Objective(access="black_box"), TrainConfig(lr=0.05, schedule="constant", batch_size=7)),
    ],
)
def test_vectorised_copies_equal_one_at_a_time(objective, train):
    common = {"num_models": 6, "objective": objective, "train": train, "dtype": "float64"}
    problem = mlp_problem(torch.float64)
    batched = losses(DaunceConfig.paper(**common), problem, group_size=6)
    alone = losses(DaunceConfig.paper(**common), problem, group_size=1, vectorize=False)
    np.testing.assert_allclose(batched.train, alone.train, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(batched.query, alone.query, rtol=1e-10, atol=1e-12)
    assert np.ptp(batched.train, axis=0).max() > 1e-6  # the copies really differ


def test_float32_vectorised_copies_agree_within_float_tolerance():
    common = {"num_models": 8, "train": TrainConfig(lr=0.05, epochs=2, batch_size=8)}
    batched = losses(DaunceConfig.paper(**common), group_size=8)
    alone = losses(DaunceConfig.paper(**common), group_size=1, vectorize=False)
    np.testing.assert_allclose(batched.train, alone.train, rtol=1e-4, atol=1e-5)


def test_copies_do_not_depend_on_grouping_or_order():
    config = DaunceConfig.paper(num_models=7, train=TrainConfig(lr=0.05, epochs=1))
    grouped = losses(config, group_size=3)
    model, train, queries = mlp_problem()
    copies = TorchModuleAccess(model, ClassificationTask(), train, queries, config, base_l2=1e-3)
    reversed_ = copies.run([6, 5, 4, 3, 2, 1, 0])
    np.testing.assert_allclose(reversed_.train[::-1], grouped.train, rtol=1e-5, atol=1e-6)


def test_evaluation_does_not_depend_on_batch_size():
    common = {"num_models": 4, "train": TrainConfig(lr=0.05, epochs=1), "dtype": "float64"}
    problem = mlp_problem(torch.float64)
    small = losses(DaunceConfig.paper(**common), problem, eval_batch_size=7)
    large = losses(DaunceConfig.paper(**common), problem, eval_batch_size=4096)
    np.testing.assert_allclose(small.train, large.train, rtol=1e-12)


def test_diverged_copies_are_reported_by_index_and_left_out_of_the_scores():
    x, y = exploding_data()
    model, train, queries = torch.nn.Linear(7, 1), {"x": x, "y": y}, {"x": x[:10], "y": y[:10]}
    config = DaunceConfig.paper(
        num_models=8, subset_ratio=0.3, train=TrainConfig(lr=0.1, epochs=3, batch_size=6)
    )
    copies = TorchModuleAccess(model, RegressionTask(), train, queries, config)
    poisoned = [k for k, d in enumerate(copies.draws(range(8))) if 5 in d.subset]
    assert 0 < len(poisoned) < 8
    with pytest.warns(DaunceWarning, match=re.escape(f"perturbed copies {poisoned} diverged")):
        rows = copies.run(range(8))
    assert rows.diverged.nonzero()[0].tolist() == poisoned
    healthy = ~rows.diverged
    assert np.isfinite(rows.train[healthy]).all()
    assert np.isnan(rows.train[rows.diverged]).all()
    # The healthy copies are exactly what they are when trained without the poisoned ones.
    alone = copies.run([k for k in range(8) if k not in poisoned])
    np.testing.assert_allclose(rows.train[healthy], alone.train, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DaunceWarning)
        result = attribute(model, RegressionTask(), train, queries, config)
    assert result.excluded.tolist() == poisoned
    assert np.isfinite(result.scores).all()


def test_fit_trains_a_base_model():
    model, train, queries = mlp_problem(n=200, m=50)
    task = ClassificationTask()
    before = task.per_example_loss(model, train).mean().item()
    fit(model, task, train, TrainConfig(lr=0.1, epochs=40, batch_size=32), l2=1e-4)
    with torch.no_grad():
        after = task.per_example_loss(model, train).mean().item()
        accuracy = (model(queries["x"]).argmax(1) == queries["y"]).float().mean().item()
    assert after < 0.5 * before
    assert accuracy > 0.7


def test_total_steps_follow_epochs_or_steps():
    assert TrainConfig(epochs=2, batch_size=10).total_steps(95) == 20
    assert TrainConfig(epochs=0.5, batch_size=10).total_steps(95) == 5
    assert TrainConfig(steps=7, epochs=3).total_steps(95) == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "lbfgs"}, "optimizer must be"),
        ({"schedule": "step"}, "schedule must be"),
        ({"lr": 0.0}, "lr > 0"),
        ({"batch_size": 0}, "batch_size >= 1"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_training_settings_are_refused(kwargs, match):
    with pytest.raises(DaunceError, match=match):
        TrainConfig(**kwargs)


def test_model_initialisation_is_reproducible_from_concurrent_threads():
    """Mapped tasks build models in threads; each must get exactly its seed's initial weights."""
    from concurrent.futures import ThreadPoolExecutor

    from daunce_core.access.torch_module.models import build_model

    recipe = {"kind": "mlp", "inputs": 64, "hidden": [256, 256], "outputs": 10}
    seeds = list(range(8)) * 4
    serial = {s: build_model(recipe, seed=s).state_dict() for s in range(8)}
    with ThreadPoolExecutor(8) as pool:
        built = list(pool.map(lambda s: (s, build_model(recipe, seed=s).state_dict()), seeds))
    for seed, state in built:
        for name, value in state.items():
            torch.testing.assert_close(value, serial[seed][name], rtol=0, atol=0)

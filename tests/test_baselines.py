"""Baselines against their closed forms; TracIn and its checkpoints; the uniform entry point."""

import math

import numpy as np
import pytest
import torch

from daunce_core import ClassificationTask, DaunceError, DaunceWarning, TrainConfig, fit
from daunce_core.access.torch_module.models import build_model
from daunce_core.baselines.exact import (
    FlatModel,
    exact_targets,
    loss_hessian,
    per_example_gradients,
)
from daunce_core.baselines.methods import (
    BASELINES,
    INFLUENCE_SHIFT,
    baseline_scores,
    fit_checkpoints,
    gradient_dot,
    influence,
    tracin,
    trak,
)
from daunce_core.evaluation.problems import logistic_regression


def problem():
    return logistic_regression(n=40, m=6)


def test_gradient_dot_is_the_inner_product_of_per_example_gradients():
    prob = problem()
    flat = FlatModel(prob.model, prob.task)
    g_train = per_example_gradients(flat, prob.train, prob.task.loss_from_outputs)
    g_query = per_example_gradients(flat, prob.queries, prob.task.loss_from_outputs)
    expected = (g_train @ g_query.T).numpy()
    np.testing.assert_allclose(
        gradient_dot(prob.model, prob.task, prob.train, prob.queries), expected, rtol=1e-12
    )
    # One pair by plain autograd, independently of vmap.
    params = list(prob.model.parameters())
    loss_i = prob.task.per_example_loss(prob.model, {k: v[:1] for k, v in prob.train.items()})
    gi = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_i.sum(), params)])
    loss_j = prob.task.per_example_loss(prob.model, {k: v[:1] for k, v in prob.queries.items()})
    gj = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_j.sum(), params)])
    assert np.isclose(expected[0, 0], (gi @ gj).item(), rtol=1e-10)


def test_influence_matches_the_exact_targets_module():
    prob = problem()
    ours = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2)
    exact = exact_targets(
        prob.model,
        prob.task,
        prob.train,
        prob.queries,
        variant="hessian",
        labels="observed",
        l2=prob.l2,
    )
    np.testing.assert_allclose(ours, exact.influence, rtol=1e-10)
    damped = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2, damping=10.0)
    assert np.abs(damped).max() < np.abs(ours).max()
    # damping=None (the pipeline's default) shifts only an indefinite Hessian: this one is convex.
    auto = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2, damping=None)
    np.testing.assert_allclose(auto, ours, rtol=1e-10)


def test_default_influence_damping_mirrors_the_most_negative_curvature():
    model, task, train, queries, _, _ = mlp_setup()
    hessian = loss_hessian(FlatModel(model, task), train)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues[0] < 0  # the trained MLP's Hessian is indefinite
    delta = INFLUENCE_SHIFT * float(-eigenvalues[0])
    auto = influence(model, task, train, queries, l2=1e-3, damping=None)
    by_hand = influence(model, task, train, queries, l2=1e-3, damping=delta)
    np.testing.assert_allclose(auto, by_hand, rtol=1e-8)
    assert not np.allclose(auto, influence(model, task, train, queries, l2=1e-3), rtol=1e-3)
    assert torch.linalg.eigvalsh(hessian + delta * torch.eye(len(hessian)))[0] > 0


def test_trak_with_a_full_rank_projection_equals_the_unprojected_formula():
    prob = problem()
    flat = FlatModel(prob.model, prob.task)
    phi_train = per_example_gradients(flat, prob.train, prob.task.margin_from_outputs)
    phi_query = per_example_gradients(flat, prob.queries, prob.task.margin_from_outputs)
    with torch.no_grad():
        p = torch.sigmoid(prob.task.margin_from_outputs(prob.model(prob.train["x"]), prob.train))
    kernel = phi_train.T @ phi_train
    expected = ((1 - p)[:, None] * (phi_train @ torch.linalg.solve(kernel, phi_query.T))).numpy()
    # A softmax's margins ignore a shift shared by every logit: the kernel is singular in that
    # one direction (it says so), and both solves below agree on the rest.
    with pytest.warns(DaunceWarning, match="kernel is singular"):
        square = trak(
            prob.model,
            prob.task,
            prob.train,
            prob.queries,
            projection_dim=flat.theta.numel(),
            damping=0.0,
        )
    np.testing.assert_allclose(square, expected, rtol=1e-6, atol=1e-9)
    small = trak(prob.model, prob.task, prob.train, prob.queries, projection_dim=4)
    assert np.corrcoef(small.ravel(), expected.ravel())[0, 1] < 0.999  # projection loses some


def mlp_setup(n=40, m=5):
    """A small MLP classifier, its recipe and its trained base model (float64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + m, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train, queries = {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}

    def make_model(seed):
        return build_model({"kind": "mlp", "inputs": 4, "hidden": [6], "outputs": 3}, seed).double()

    config = TrainConfig(lr=0.1, epochs=4, batch_size=8)
    model = fit(make_model(0), ClassificationTask(), train, config, l2=1e-3, seed=0)
    return model, ClassificationTask(), train, queries, make_model, config


def test_tracin_with_one_checkpoint_and_unit_rate_is_the_gradient_dot_product():
    prob = problem()
    for measurement in ("loss", "margin"):
        expected = gradient_dot(prob.model, prob.task, prob.train, prob.queries, measurement)
        ours = tracin([prob.model], [1.0], prob.task, prob.train, prob.queries, measurement)
        np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(
        tracin([prob.model], [1.0], prob.task, prob.train, prob.queries, "loss"), expected
    )  # the measurements differ, so the check above has teeth
    doubled = tracin(
        [prob.model, prob.model], [0.5, 1.5], prob.task, prob.train, prob.queries, "loss"
    )
    single = gradient_dot(prob.model, prob.task, prob.train, prob.queries)
    np.testing.assert_allclose(doubled, 2 * single, rtol=1e-12)
    with pytest.raises(DaunceError, match="one learning rate per checkpoint"):
        tracin([prob.model], [1.0, 2.0], prob.task, prob.train, prob.queries)


def test_fit_checkpoints_end_bitwise_at_fit_and_weigh_by_the_interval_learning_rate():
    model, task, train, _, make_model, config = mlp_setup()
    checkpoints = fit_checkpoints(make_model(0), task, train, config, l2=1e-3, seed=0, count=3)
    assert len(checkpoints) == 3
    last_state, _ = checkpoints[-1]
    for name, value in model.state_dict().items():
        assert torch.equal(last_state[name], value), name  # bitwise: same trainer, same steps
    # Evenly spaced (20 steps: at 7, 13, 20) and distinct; the learning rate is each stretch's
    # mean (cosine: decreasing, positive even for the last stretch).
    states = [state["0.weight"] for state, _ in checkpoints]
    assert not torch.equal(states[0], states[1])
    rates = [lr for _, lr in checkpoints]
    assert rates[0] > rates[1] > rates[2] > 0
    total = config.total_steps(40)
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert rates[0] == pytest.approx(np.mean(cosine[:7]))
    assert rates[2] == pytest.approx(np.mean(cosine[13:]))
    constant = TrainConfig(lr=0.2, steps=6, batch_size=8, schedule="constant")
    flat = fit_checkpoints(make_model(0), task, train, constant, count=6)
    assert [lr for _, lr in flat] == pytest.approx([0.2] * 6)
    with pytest.raises(DaunceError, match="count must be in"):
        fit_checkpoints(make_model(0), task, train, constant, count=7)


def test_baseline_scores_every_method_gives_finite_train_by_query_scores():
    model, task, train, queries, make_model, config = mlp_setup()
    options = {"trak": {"projection_dim": 16}, "trak_ensemble": {"models": 2, "projection_dim": 16}}
    for method in BASELINES:
        scores = baseline_scores(
            method,
            model,
            task,
            train,
            queries,
            l2=1e-3,
            make_model=make_model,
            train_config=config,
            options=options.get(method),
        )
        assert scores.shape == (40, 5), method
        assert np.isfinite(scores).all(), method
        assert np.abs(scores).max() > 0, method
    # tracin through the entry point = tracin over fit_checkpoints' models.
    checkpoints = fit_checkpoints(make_model(0), task, train, config, l2=1e-3, count=2)
    models = []
    for state, _ in checkpoints:
        clone = make_model(0)
        clone.load_state_dict(state)
        models.append(clone)
    direct = tracin(models, [lr for _, lr in checkpoints], task, train, queries)
    via = baseline_scores(
        "tracin", model, task, train, queries, l2=1e-3, make_model=make_model,
        train_config=config, options={"checkpoints": 2},
    )  # fmt: skip
    np.testing.assert_allclose(via, direct, rtol=1e-12)


def test_baseline_scores_errors_name_the_valid_choices():
    model, task, train, queries, make_model, config = mlp_setup(n=12, m=2)
    with pytest.raises(DaunceError, match="valid: gradient_dot, influence, trak, tracin, ekfac"):
        baseline_scores("datamodels", model, task, train, queries, l2=1e-3)
    with pytest.raises(DaunceError, match=r"\['projection'\].*valid: projection_dim, damping"):
        baseline_scores("trak", model, task, train, queries, l2=1e-3, options={"projection": 8})
    with pytest.raises(DaunceError, match="make_model"):
        baseline_scores("tracin", model, task, train, queries, l2=1e-3)
    with pytest.raises(DaunceError, match="make_model"):
        baseline_scores("trak_ensemble", model, task, train, queries, l2=1e-3)
    other = fit(make_model(5), task, train, config, l2=1e-3, seed=5)
    with pytest.warns(DaunceWarning, match="do not end at the given model"):
        baseline_scores(
            "tracin", other, task, train, queries, l2=1e-3, make_model=make_model,
            train_config=config, options={"checkpoints": 1},
        )  # fmt: skip


def test_loss_hessian_is_the_same_for_any_chunk_of_examples():
    model, task, train, _, _, _ = mlp_setup()  # n = 40: chunks of 7 leave a partial last one
    flat = FlatModel(model, task)
    whole = torch.func.hessian(
        lambda theta: task.loss_from_outputs(flat.outputs(theta, train), train).mean()
    )(flat.theta)
    for chunk_size in (1, 7, 40, 1000):
        np.testing.assert_allclose(
            loss_hessian(flat, train, chunk_size=chunk_size), whole, rtol=1e-10, atol=1e-12
        )


def test_trak_warns_of_a_projection_wider_than_its_examples_can_span():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)  # 8 parameters
    data = {"x": torch.randn(20, 3), "y": torch.randint(0, 2, (20,))}
    with pytest.warns(DaunceWarning, match=r"kernel is singular.*smaller projection_dim"):
        trak(model, ClassificationTask(), data, data, projection_dim=64)


def test_gauss_newton_in_chunks_equals_all_at_once(monkeypatch):
    from daunce_core.baselines import exact

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = {"x": torch.randn(30, 4), "y": torch.randint(0, 3, (30,))}
    flat = exact.FlatModel(model, ClassificationTask())
    whole = exact.gauss_newton(flat, data)
    size = flat.theta.numel()
    monkeypatch.setattr(exact, "GN_CHUNK_BYTES", 7 * size * size * 4)  # chunks of 7 examples
    torch.testing.assert_close(exact.gauss_newton(flat, data), whole, rtol=1e-5, atol=1e-7)

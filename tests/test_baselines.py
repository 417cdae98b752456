"""Baselines against their closed forms."""

import numpy as np
import torch

from daunce_core.baselines import gradient_dot, influence, trak
from daunce_core.influence import FlatModel, exact_targets, per_example_gradients
from daunce_core.problems import logistic_regression


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


def test_trak_with_a_full_rank_projection_equals_the_unprojected_formula():
    prob = problem()
    flat = FlatModel(prob.model, prob.task)
    phi_train = per_example_gradients(flat, prob.train, prob.task.margin_from_outputs)
    phi_query = per_example_gradients(flat, prob.queries, prob.task.margin_from_outputs)
    with torch.no_grad():
        p = torch.sigmoid(prob.task.margin_from_outputs(prob.model(prob.train["x"]), prob.train))
    kernel = phi_train.T @ phi_train
    expected = ((1 - p)[:, None] * (phi_train @ torch.linalg.solve(kernel, phi_query.T))).numpy()
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

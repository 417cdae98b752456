"""DAUNCE's covariance against the exact forms of linear and logistic regression (float64).

At ρ = 0.1 the copies stay in the linear-response regime, trained to their perturbed optimum
(full batch, enough steps); the covariance then matches the exact sandwich that each variant
targets (``daunce_core.baselines.exact``) in direction *and* magnitude, ``(ρ/γ)²/s`` included.
"""

import functools

import numpy as np
import pytest

from daunce_core import ComputeConfig, DaunceConfig, Objective, TrainConfig, attribute
from daunce_core.baselines.exact import exact_targets
from daunce_core.evaluation.problems import linear_regression, logistic_regression

RHO = 0.1
K = 400


@functools.cache
def problem(name):
    return {"linear": linear_regression, "logistic": logistic_regression}[name](n=80, m=15)


def run(prob, objective, *, r=1.0, num_models=K, score="covariance", lr=0.5):
    size = round(r * len(prob.train["y"]))
    config = DaunceConfig(
        num_models=num_models,
        subset_ratio=r,
        objective=objective,
        train=TrainConfig(lr=lr, steps=150, batch_size=size, schedule="constant"),
        dtype="float64",
        score=score,
    )
    compute = ComputeConfig(group_size=num_models)
    return attribute(
        prob.model, prob.task, prob.train, prob.queries, config, base_l2=prob.l2, compute=compute
    )


def agreement(estimate, target):
    est, tgt = np.ravel(estimate), np.ravel(target)
    corr = np.corrcoef(est, tgt)[0, 1]
    slope = est @ tgt / (tgt @ tgt)
    return corr, slope


def targets(prob, variant, labels, scale):
    return exact_targets(
        prob.model,
        prob.task,
        prob.train,
        prob.queries,
        variant=variant,
        labels=labels,
        l2=prob.l2,
        scale=scale,
    )


CASES = [
    ("linear", "hessian", "observed"),
    ("linear", "hessian", "sampled"),
    ("linear", "efim", "observed"),
    ("logistic", "hessian", "observed"),
    ("logistic", "hessian", "sampled"),
    ("logistic", "efim", "observed"),
    ("logistic", "efim", "sampled"),
    ("logistic", "trak", "observed"),
    ("logistic", "trak", "sampled"),
]


@pytest.mark.parametrize(("name", "variant", "labels"), CASES)
def test_covariance_matches_exact_sandwich(name, variant, labels):
    prob = problem(name)
    result = run(prob, Objective(variant=variant, labels=labels, rho=RHO))
    exact = targets(prob, variant, labels, RHO**2 / len(prob.train["y"]))
    corr, slope = agreement(result.scores, exact.target)
    assert corr > 0.95
    assert 0.85 < slope < 1.15
    self_corr, self_slope = agreement(result.self_influence, exact.self_target)
    assert self_corr > 0.95
    assert 0.8 < self_slope < 1.2


def test_efim_with_sampled_labels_on_least_squares_needs_a_smaller_rho():
    # The sampled noise is not scaled by the residuals that weigh efim's curvature, so at ρ = 0.1
    # the quartic terms of ½(L − L0)² matter (slope ≈ 0.7); at ρ = 0.01 the response is linear.
    prob = problem("linear")
    result = run(prob, Objective(variant="efim", labels="sampled", rho=0.01))
    exact = targets(prob, "efim", "sampled", 0.01**2 / len(prob.train["y"]))
    corr, slope = agreement(result.scores, exact.target)
    assert corr > 0.95
    assert 0.85 < slope < 1.15


def test_sampled_labels_reach_the_influence_function_on_least_squares():
    # Gauss-Newton = Hessian for squared loss: the sampled-label limit is H⁻¹(H−λ)H⁻¹ ≈ H⁻¹.
    prob = problem("linear")
    result = run(prob, Objective(labels="sampled", rho=RHO))
    exact = targets(prob, "hessian", "sampled", 1.0)
    corr, _ = agreement(result.scores, exact.influence)
    assert corr > 0.97


def test_only_rho_over_gamma_matters():
    # γ weighs the whole curvature part (proximal term included) and ρ the perturbation: halving
    # both, with the learning rate doubled, must give the very same copies.
    prob = problem("logistic")
    base = run(prob, Objective(rho=RHO), num_models=20)
    scaled = run(prob, Objective(rho=RHO / 2, gamma=0.5), num_models=20, lr=1.0)
    np.testing.assert_allclose(scaled.losses_train, base.losses_train, rtol=1e-9)


def test_error_shrinks_as_k_grows():
    prob = problem("logistic")
    exact = targets(prob, "hessian", "observed", RHO**2 / len(prob.train["y"]))
    errors = []
    for num_models in (25, 400):
        scores = run(prob, Objective(rho=RHO), num_models=num_models).scores
        errors.append(np.linalg.norm(scores - exact.target) / np.linalg.norm(exact.target))
    assert errors[1] < 0.5 * errors[0]


def test_subsampled_copies_follow_the_same_target():
    prob = problem("logistic")
    result = run(prob, Objective(rho=RHO), r=0.5)
    size = round(0.5 * len(prob.train["y"]))
    exact = targets(prob, "hessian", "observed", RHO**2 / size)
    corr, slope = agreement(result.scores, exact.target)
    assert corr > 0.9
    assert 0.75 < slope < 1.25


def test_black_box_copies_follow_the_bootstrap_sandwich():
    # Plain ERM on random halves: Δθ = −(H+λ)⁻¹ · (subset-mean gradient), whose covariance
    # (sampling without replacement) is (1 − r)/s · F: the observed-label target times 3(1 − r).
    # Nothing scales the subset noise down here, so the linear response needs more data: at
    # n = 80 the slope is ~1.9 (curvature of half the data fluctuates), at n = 400 ~1.2.
    prob = logistic_regression(n=400, m=15)
    result = run(prob, Objective(access="black_box"), r=0.5)
    exact = targets(prob, "hessian", "observed", 3 * 0.5 / 200)
    corr, slope = agreement(result.scores, exact.target)
    assert corr > 0.95
    assert 0.9 < slope < 1.35

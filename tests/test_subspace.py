"""The subspace-curvature scores against closed forms (DESIGN §1, `daunce_core.method.subspace`).

On a model whose logits are linear in its parameters (softmax and least-squares regression) the
Gauss-Newton curvature is the Hessian, so once the copies span the parameter space (K ≥ P) the
scores are the exact influence function ``(1/n) ∇L_iᵀ (H + λ)⁻¹ ∇M_j`` whatever the copies are:
the only error left is the third-order term of the central differences, ``O(ρ²)``. Neither the
base model nor the copies need to be at an optimum, so the problems here are not fitted (fast).
"""

import functools

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import (
    ClassificationTask,
    ComputeConfig,
    DaunceConfig,
    DaunceError,
    Objective,
    RegressionTask,
    Task,
    TrainConfig,
    attribute,
)
from daunce_core.access.torch_module.access import TorchModuleAccess
from daunce_core.baselines.exact import (
    FlatModel,
    gauss_newton,
    influence_function,
    loss_hessian,
    measurement_fn,
    per_example_gradients,
)
from daunce_core.method.scores import score_matrix
from daunce_core.method.subspace import curvature_pinv, subspace_scores

N, M, K, L2 = 40, 8, 24, 1e-2


@functools.cache
def problem(name):
    """A random softmax (3 classes, P = 15) or least-squares (P = 5) regression, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + M, 4, generator=g, dtype=torch.float64)
    if name == "logistic":
        model, task = nn.Linear(4, 3).double(), ClassificationTask()
        y = torch.randint(0, 3, (N + M,), generator=g)
    else:
        model, task = nn.Linear(4, 1).double(), RegressionTask()
        y = x.sum(dim=1) + torch.randn(N + M, generator=g, dtype=torch.float64)
    data = {"x": x, "y": y}
    train, queries = ({k: v[rows] for k, v in data.items()} for rows in (slice(N), slice(N, None)))
    return model, task, train, queries


def config(rho=0.01, steps=5, **changes):
    return DaunceConfig(
        num_models=K,
        subset_ratio=1.0,
        objective=Objective(labels="sampled", rho=rho),
        train=TrainConfig(lr=0.5, steps=steps, batch_size=N, schedule="constant"),
        dtype="float64",
        score="subspace",
        **changes,
    )


@functools.cache
def run(name, group_size=K, **changes):
    model, task, train, queries = problem(name)
    compute = ComputeConfig(group_size=group_size)
    return attribute(model, task, train, queries, config(**changes), base_l2=L2, compute=compute)


@functools.cache
def exact_influence(name, l2, measurement="loss"):
    model, task, train, queries = problem(name)
    flat = FlatModel(model, task)
    g_train = per_example_gradients(flat, train, task.loss_from_outputs)
    g_query = per_example_gradients(flat, queries, measurement_fn(task, measurement))
    eye = torch.eye(flat.theta.numel(), dtype=torch.float64)
    return influence_function(g_train, g_query, loss_hessian(flat, train) + l2 * eye).numpy()


def relative_error(estimate, target):
    return np.linalg.norm(estimate - target) / np.linalg.norm(target)


@pytest.mark.parametrize(
    ("name", "measurement", "prox"),
    [
        ("linear", "loss", None),
        ("logistic", "loss", None),
        ("logistic", "margin", None),
        ("logistic", "loss", 0.05),
    ],
)
def test_k_above_p_gives_the_exact_influence_function(name, measurement, prox):
    result = run(name, measurement=measurement, prox=prox)
    lam = L2 if prox is None else prox  # the copies' proximal λ is the curvature's damping
    exact = exact_influence(name, lam, measurement)
    assert relative_error(result.scores, exact) < 1e-4
    if prox is not None:  # the λ term matters far beyond the tolerance
        assert relative_error(exact_influence(name, L2), exact) > 0.05


def test_sign_and_orientation_agree_with_the_covariance_of_the_same_copies():
    result = run("logistic", rho=0.1, steps=15)
    covariance = score_matrix(result.losses_train, result.losses_query, kind="covariance")
    assert result.scores.shape == covariance.shape == (N, M)
    assert np.corrcoef(result.scores.ravel(), covariance.ravel())[0, 1] > 0.5


def test_copies_order_and_grouping_do_not_change_the_scores():
    whole, grouped = run("logistic"), run("logistic", group_size=8)
    np.testing.assert_allclose(grouped.scores, whole.scores, rtol=1e-6, atol=1e-9)
    parts = whole.subspace
    order = np.random.default_rng(0).permutation(K)
    permuted = subspace_scores(
        parts.train.central()[order],
        parts.query.central()[order],
        parts.curvature[np.ix_(order, order)],
    )
    np.testing.assert_allclose(permuted, whole.scores, rtol=1e-5, atol=1e-9)


def test_reflected_central_differences_beat_one_sided_at_finite_steps():
    # At ρ = 0.1 the copies move far enough for the second-order term to show: the one-sided
    # loss changes keep it (error O(ρ)), the central ones cancel it (error O(ρ²)).
    result = run("logistic", rho=0.1, steps=15)
    parts, exact = result.subspace, exact_influence("logistic", L2)
    one_sided = subspace_scores(parts.train.one_sided(), parts.query.one_sided(), parts.curvature)
    central_error = relative_error(result.scores, exact)
    one_sided_error = relative_error(one_sided, exact)
    assert one_sided_error > 1e-2
    assert central_error < 0.25 * one_sided_error


def test_curvature_is_the_gauss_newton_form_in_the_copies_span_of_an_mlp():
    # Logits not linear in θ: Q = Δᵀ(GN + λ)Δ up to O(ρ²), with K < P copies.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    _, task, train, queries = problem("logistic")
    access = TorchModuleAccess(model, task, train, queries, config(), base_l2=L2)
    trained = access.train(range(6))
    flat = FlatModel(access.model, task)
    delta = torch.cat(
        [(trained.params[n] - access.anchor[n]).reshape(6, -1) for n in flat.names], dim=1
    )
    curvature = gauss_newton(flat, train) + L2 * torch.eye(flat.theta.numel(), dtype=delta.dtype)
    expected = (delta @ curvature @ delta.T).numpy()
    assert relative_error(access.measure_reflected(trained).curvature, expected) < 1e-4


class AutogradClassification(ClassificationTask):
    """The classification task with `Task`'s default (autograd) output Hessian product."""

    output_hessian_product = Task.output_hessian_product


@pytest.mark.parametrize(
    ("task", "default", "target"),
    [
        (ClassificationTask(), AutogradClassification(), torch.randint(0, 3, (5,))),
        (RegressionTask(), None, torch.randn(5, dtype=torch.float64)),
    ],
)
def test_closed_form_output_hessians_equal_autograd(task, default, target):
    outputs = torch.randn(5, 3, dtype=torch.float64) if default else torch.randn(5).double()
    vectors = torch.randn(4, *outputs.shape, dtype=torch.float64)
    batch = {"y": target}
    reference = Task.output_hessian_product(default or task, outputs, batch, vectors)
    torch.testing.assert_close(task.output_hessian_product(outputs, batch, vectors), reference)


def test_truncation_drops_repeated_directions():
    # Two copies along one direction: Q has rank 1; the scores are those of either copy alone.
    a, b = np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([[3.0], [6.0]])
    q = np.array([[2.0, 4.0], [4.0, 8.0]])
    pinv, rank = curvature_pinv(q)
    assert rank == 1
    np.testing.assert_allclose(subspace_scores(a, b, q), subspace_scores(a[:1], b[:1], q[:1, :1]))
    np.testing.assert_allclose(pinv @ q @ pinv, pinv, atol=1e-12)


def test_bad_inputs_raise_with_the_fix():
    with pytest.raises(DaunceError, match="did not move"):
        subspace_scores(np.ones((2, 3)), np.ones((2, 1)), np.zeros((2, 2)))
    with pytest.raises(DaunceError, match="same copies"):
        subspace_scores(np.ones((2, 3)), np.ones((3, 1)), np.eye(2))
    with pytest.raises(DaunceError, match="diverged"):
        subspace_scores(np.full((2, 3), np.nan), np.ones((2, 1)), np.eye(2))


def test_lora_copies_of_a_causal_lm_give_the_gauss_newton_influence_of_the_adapter():
    """K ≥ P LoRA copies: the scores are ``(1/n) ∇L_iᵀ (G + λ)⁻¹ ∇M_j`` in the adapter's weights.

    G the Gauss-Newton curvature of the mean completion NLL (every token × the whole vocabulary,
    from autograd Jacobians), against which the stored factors (hidden width per token) are exact.
    """
    from test_access_hf import base, split
    from torch.func import jacrev

    from daunce_core.access.hf_lora.access import HFLoraAccess, make_task
    from daunce_core.access.hf_lora.models import LoraSpec
    from daunce_core.access.torch_module.stacked import copy_outputs_fn

    torch.set_num_threads(1)
    train, queries = split("causal_lm")
    lora = LoraSpec(rank=1, alpha=1, target_modules=["c_attn"])  # P = 128
    settings = DaunceConfig(
        num_models=160, prox=1e-5, train=TrainConfig(lr="auto", epochs=1, batch_size=16)
    )
    access = HFLoraAccess(
        base("causal_lm")[0], make_task("causal_lm"), train, queries, settings, lora,
        compute=ComputeConfig(device="cpu", group_size=32),
    )  # fmt: skip
    _, parts = access.run_subspace(range(160))
    scores = subspace_scores(parts.train.central(), parts.query.central(), parts.curvature)

    names, anchor, task = access.names, access.anchor, access.task
    sizes = [anchor[name].numel() for name in names]
    outputs_of = copy_outputs_fn(access.model, task)

    def logits(flat, batch):
        pieces = torch.split(flat, sizes)
        params = {n: p.reshape(anchor[n].shape) for n, p in zip(names, pieces, strict=True)}
        return outputs_of(params, batch)

    theta0 = torch.cat([anchor[name].reshape(-1) for name in names])
    n = train["input_ids"].shape[0]
    jacobian = torch.cat(
        [jacrev(logits, chunk_size=512)(theta0, {k: v[i : i + 1] for k, v in train.items()})
         for i in range(n)]
    ).double()  # fmt: skip  # [n, C, V, P]
    probs = logits(theta0, train).double().softmax(dim=-1)
    weights = task._weights(train, probs)[..., None, None]
    centred = (jacobian - (probs[..., None] * jacobian).sum(dim=2, keepdim=True)) * (
        probs[..., None] * weights
    ).sqrt()
    curvature = torch.einsum("ictp,ictq->pq", centred, centred) / n + 1e-5 * torch.eye(128)

    def gradients(data):
        return jacrev(lambda f: task.loss_from_outputs(logits(f, data), data))(theta0).double()

    exact = gradients(train) @ torch.linalg.solve(curvature, gradients(queries).T) / n
    assert np.corrcoef(scores.ravel(), exact.numpy().ravel())[0, 1] > 0.995
    np.testing.assert_allclose(scores, exact.numpy(), atol=0.05 * np.abs(exact.numpy()).max())


@pytest.mark.parametrize("tokens", [1, 3])
def test_probe_factors_estimate_the_gauss_newton_curvature_by_the_fisher_identity(tokens):
    """API copies' ``Q`` from completions sampled from θ0 (`daunce_core.access.api.probes`).

    A model of ``tokens`` independent softmax positions (loss: the mean NLL over them) and three
    small displacements of its logits: ``(1/n_c) Σ_p C_p d_kp d_lp`` over many sampled probes
    approaches ``(1/n) Σ_i dz_ikᵀ H_i dz_il`` with ``H_i = (1/C) Σ_t (diag p_t − p_t p_tᵀ)``.
    """
    from daunce_core.access.api.probes import ProbeSet, probe_factors

    rng = np.random.default_rng(0)
    n, classes, samples = 50, 4, 400
    logits = rng.normal(size=(n, tokens, classes))
    moves = 1e-3 * rng.normal(size=(3, n, tokens, classes))  # dz of three copies
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    centred = moves - (probs * moves).sum(-1, keepdims=True)
    exact = np.einsum("kitc,litc,itc->kl", centred, centred, probs) / (n * tokens)

    def mean_nll(z, drawn):  # [..., n, tokens, classes], [S, n, tokens] -> [..., S, n]
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        onehot = np.eye(classes)[drawn]  # [S, n, tokens, classes]
        return -(logp[..., None, :, :, :] * onehot).sum(-1).mean(-1)

    cdf = probs.cumsum(-1)
    drawn = (rng.random((samples, n, tokens, 1)) > cdf).sum(-1).clip(max=classes - 1)
    base = mean_nll(logits, drawn).reshape(-1)
    probes = ProbeSet(
        rows=list(range(samples * n)),
        completions=["x"] * (samples * n),
        tokens=[tokens] * (samples * n),
        probe=base.tolist(),
        train=[],
        query=[],
        queries_key="",
    )
    copies = mean_nll(logits + moves, drawn).reshape(3, -1)
    factors = probe_factors(copies, probes).astype(np.float64)
    estimate = factors @ factors.T / (samples * n)
    np.testing.assert_allclose(estimate, exact, rtol=0.1, atol=0.05 * np.abs(exact).max())

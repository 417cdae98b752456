"""The peer packages' methods (kronfluence EK-FAC, traker TRAK) against exact closed forms.

Real packages, no mocks. Scores must come out ``[n_train, m_query]`` with positive = proponent.
"""

import numpy as np
import pytest
import torch
from torch import nn

from daunce_core import ClassificationTask, DaunceError, RegressionTask, Task
from daunce_core.baselines.exact import FlatModel, per_example_gradients
from daunce_core.baselines.methods import influence, trak
from daunce_core.baselines.peers import ekfac, trak_scores
from daunce_core.evaluation.problems import fit_exact, linear_regression, logistic_regression

pytest.importorskip("kronfluence")
pytest.importorskip("trak")


def corr(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def slope(a, b):
    """Least-squares slope of ``a`` on ``b`` through 0 (the relative scale)."""
    return float((a * b).sum() / (b * b).sum())


class RademacherRegression(RegressionTask):
    """Least squares whose sampled-label noise is ±1 instead of N(0, 1).

    Both have the output Hessian (1) as covariance, so both give the true Fisher in expectation;
    ±1 has constant magnitude, so the sampled Fisher of a linear model is exactly
    ``(1/n) Σ a_i a_iᵀ`` (``a_i = [x_i, 1]``) — the Hessian — with no Monte-Carlo error.
    """

    def logit_noise(self, outputs, batch, xi):
        return torch.where(xi < 0.5, -1.0, 1.0).to(outputs.dtype).reshape(outputs.shape)


def test_ekfac_is_the_exact_influence_function_where_ekfac_is_exact():
    # One linear layer with a scalar least-squares output: the per-example gradient is
    # g_i · [x_i, 1] with g_i the (sampled, here ±1) output gradient, so the Fisher is
    # E[a aᵀ] ⊗ E[g²] = (1/n) Σ a aᵀ ⊗ 1 — a Kronecker product with a 1×1 factor, which K-FAC
    # represents exactly and whose eigenbasis EK-FAC's corrected eigenvalues fit exactly. For
    # a linear model under least squares that Fisher is also the Hessian (Gauss-Newton = H), so
    # EK-FAC with damping l2 + δ is the exact damped influence function, to rounding.
    prob = linear_regression(n=80, m=7, d=5)
    task = RademacherRegression()
    for damping in (0.0, 0.3):
        exact = influence(prob.model, task, prob.train, prob.queries, l2=prob.l2, damping=damping)
        scores = ekfac(prob.model, task, prob.train, prob.queries, damping=damping, l2=prob.l2)
        assert scores.shape == (80, 7)
        np.testing.assert_allclose(scores, exact, rtol=1e-6, atol=1e-9 * np.abs(exact).max())


def test_ekfac_with_gaussian_sampled_labels_and_empirical_fisher_on_least_squares():
    # The default RegressionTask draws N(0, 1) labels: exact in expectation, Monte-Carlo error
    # of order sqrt(2/n) in each eigenvalue. The empirical Fisher weighs examples by their
    # squared residuals, a different curvature: still the same direction, a different scale.
    prob = linear_regression(n=200, m=10)
    exact = influence(prob.model, prob.task, prob.train, prob.queries, l2=prob.l2)
    sampled = ekfac(prob.model, prob.task, prob.train, prob.queries, damping=0.0, l2=prob.l2)
    assert corr(sampled, exact) > 0.99
    assert 0.85 < slope(sampled, exact) < 1.15
    empirical = ekfac(
        prob.model, prob.task, prob.train, prob.queries, damping=0.0, l2=prob.l2, fisher="empirical"
    )
    assert corr(empirical, exact) > 0.95


def test_ekfac_on_softmax_regression_is_close_and_has_the_right_sign():
    # Not exact: the Fisher (1/n) Σ a aᵀ ⊗ (diag p − p pᵀ) varies with the example, so its
    # Kronecker factorisation E[a aᵀ] ⊗ E[g gᵀ] is an approximation (and sampled labels add
    # Monte-Carlo error). Direction, sign and scale still follow the exact influence function.
    prob = logistic_regression(n=200, m=10)
    for measurement in ("loss", "margin"):
        exact = influence(
            prob.model, prob.task, prob.train, prob.queries, l2=prob.l2, measurement=measurement
        )
        scores = ekfac(
            prob.model,
            prob.task,
            prob.train,
            prob.queries,
            damping=0.0,
            l2=prob.l2,
            measurement=measurement,
        )
        assert scores.shape == (200, 10)
        assert corr(scores, exact) > 0.9
        assert 0.7 < slope(scores, exact) < 1.3
    # kronfluence's heuristic damping (None): finite, same direction.
    heuristic = ekfac(prob.model, prob.task, prob.train, prob.queries)
    assert corr(heuristic, exact) > 0.8


def test_ekfac_is_deterministic_and_leaves_the_model_alone():
    prob = logistic_regression(n=60, m=4)
    before = {k: v.clone() for k, v in prob.model.state_dict().items()}
    first = ekfac(prob.model, prob.task, prob.train, prob.queries, seed=3)
    second = ekfac(prob.model, prob.task, prob.train, prob.queries, seed=3)
    np.testing.assert_array_equal(first, second)
    for name, value in prob.model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.requires_grad for p in prob.model.parameters())
    assert type(prob.model) is nn.Linear  # not wrapped by kronfluence


def test_ekfac_errors_name_the_fix():
    prob = linear_regression(n=20, m=3)

    class NoNoise(Task):  # the protocol without the optional logit_noise hook
        def outputs(self, model, batch):
            return model(batch["x"]).squeeze(-1)

        def loss_from_outputs(self, outputs, batch):
            return 0.5 * (outputs - batch["y"]) ** 2

    with pytest.raises(DaunceError, match="fisher='empirical'"):
        ekfac(prob.model, NoNoise(), prob.train, prob.queries)
    empirical = ekfac(prob.model, NoNoise(), prob.train, prob.queries, fisher="empirical")
    assert empirical.shape == (20, 3)
    assert np.isfinite(empirical).all()
    with pytest.raises(DaunceError, match="fisher must be one of"):
        ekfac(prob.model, prob.task, prob.train, prob.queries, fisher="observed")
    with pytest.raises(DaunceError, match="measurement must be one of"):
        ekfac(prob.model, prob.task, prob.train, prob.queries, measurement="accuracy")

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return (x * self.w).sum(dim=1)

    with pytest.raises(DaunceError, match=r"nn\.Linear and nn\.Conv2d"):
        ekfac(Scale(), prob.task, prob.train, prob.queries)


class BinaryLogistic(nn.Module):
    """Logistic regression as a two-class classifier with the first logit fixed at 0.

    Unlike a full softmax (whose margin ignores a common shift of all logits, leaving the margin
    gradients rank-deficient), the margin gradients ``±[x, 1]`` span all parameters, so TRAK's
    unprojected kernel ``ΦᵀΦ`` is invertible and the unprojected limit is well defined.
    """

    def __init__(self, d, hidden=0):
        super().__init__()
        self.lin = (
            nn.Linear(d, 1)
            if not hidden
            else nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        )

    def forward(self, x):
        z = self.lin(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def binary_problem(n=150, m=8, d=12, hidden=0, l2=1e-2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + m, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = (torch.rand(n + m, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w)).long()
    task = ClassificationTask()
    torch.manual_seed(0)
    model = BinaryLogistic(d, hidden).double()
    fit_exact(model, task, {"x": x[:n], "y": y[:n]}, l2)
    return model, task, {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}


def probability(model, task, data):
    with torch.no_grad():
        return torch.sigmoid(task.margin_from_outputs(model(data["x"]), data)).numpy()


def unprojected_trak(model, task, train, queries):
    flat = FlatModel(model, task)
    phi = per_example_gradients(flat, train, task.margin_from_outputs)
    phi_q = per_example_gradients(flat, queries, task.margin_from_outputs)
    with torch.no_grad():
        p = torch.sigmoid(task.margin_from_outputs(model(train["x"]), train))
    return ((1 - p)[:, None] * (phi @ torch.linalg.solve(phi.T @ phi, phi_q.T))).numpy(), phi


def test_traker_reaches_the_unprojected_trak_formula_like_ours():
    # Both projections are random Gaussians; with k = 4P (well-conditioned) and a damping of
    # 1e-3 of each kernel's mean diagonal both reach the unprojected formula. (traker's kernel
    # is k × k of rank P and inverted in float32: with no damping it is garbage — the damping is
    # needed, not cosmetic. Its features are φP/√P with P ~ N(0, 1), ours φP with P ~ N(0, 1/k):
    # the kernels differ by k/P, hence the two dampings.)
    model, task, train, queries = binary_problem()
    exact, phi = unprojected_trak(model, task, train, queries)
    params, k = phi.shape[1], 4 * phi.shape[1]
    mean_sq = float((phi**2).sum())
    theirs = trak_scores(
        model, task, train, queries, projection_dim=k, damping=1e-3 * mean_sq / params
    )
    ours = trak(model, task, train, queries, projection_dim=k, damping=1e-3 * mean_sq / k)
    assert theirs.shape == (150, 8)
    assert corr(theirs, exact) > 0.999
    assert corr(theirs, ours) > 0.999
    assert slope(theirs, exact) > 0  # same sign; traker rescales (XᵀX)⁻¹ by a positive factor


def test_traker_ensemble_and_self_attribution():
    # A small tanh network (its margin gradients depend on the parameters, unlike a linear
    # model's, and tanh has no rescaling symmetry to make the kernel singular): two fits from
    # different initialisations, two different optima (both with well-conditioned kernels).
    model, task, train, queries = binary_problem(d=5, hidden=3)
    torch.manual_seed(2)
    other = BinaryLogistic(5, 3).double()
    fit_exact(other, task, train, 1e-2)
    exact, phi = unprojected_trak(model, task, train, queries)
    exact_other, _ = unprojected_trak(other, task, train, queries)
    k = 4 * phi.shape[1]
    damping = 1e-4 * float((phi**2).sum()) / phi.shape[1]
    # TRAK's ensemble: mean_c [c_c · X_c (X_cᵀX_c)⁻¹ X_c,qᵀ] · mean_c (1 − p_c), with traker's
    # positive per-model scale c_c. In the unprojected limit each model's term is its exact
    # kernel product, so the ensemble is a positive combination of the two models' own terms.
    both = trak_scores([model, other], task, train, queries, projection_dim=k, damping=damping)
    weights = [1 - probability(m, task, train) for m in (model, other)]
    terms = [e / w[:, None] for e, w in zip((exact, exact_other), weights, strict=True)]
    mean_weight = (weights[0] + weights[1])[:, None] / 2
    design = np.stack([(t * mean_weight).ravel() for t in terms], axis=1)
    coef, residual, *_ = np.linalg.lstsq(design, both.ravel(), rcond=None)
    assert (coef > 0).all()
    # (With the models' checkpoints mixed up, as an early version did, the residual was 84 %.)
    assert residual[0] < 1e-3 * (both**2).sum()
    # Sign and orientation: a query that is training example j gets from example j the score
    # (1 − p_j)·φ_jᵀ(ΦᵀΦ)⁻¹φ_j > 0 (its leverage), among the largest of its column.
    own = {key: value[:20] for key, value in train.items()}
    scores = trak_scores(model, task, train, own, projection_dim=k, damping=damping)
    assert scores.shape == (150, 20)
    diagonal = scores[np.arange(20), np.arange(20)]
    assert (diagonal > 0).all()
    rank = (scores > diagonal).sum(axis=0)  # how many train examples beat example j on query j
    assert np.median(rank) < 15


def test_traker_refuses_a_used_save_dir_and_a_singular_kernel(tmp_path):
    model, task, train, queries = binary_problem(n=20, m=2)
    with pytest.raises(DaunceError, match="singular"):  # 13 parameters: the kernel has rank 13
        trak_scores(model, task, train, queries, projection_dim=16)
    (tmp_path / "old").write_text("x")
    with pytest.raises(DaunceError, match="not empty"):
        trak_scores(model, task, train, queries, projection_dim=8, save_dir=tmp_path)

"""The perturbed objectives against their definitions (paper eq. (5), Tables 1 and 2)."""

import math

import pytest
import torch
from torch.func import functional_call, grad

from daunce_core import ClassificationTask, DaunceError, Objective
from daunce_core.baselines.exact import FlatModel, per_example_gradients
from daunce_core.method.objectives import per_example_objective
from daunce_core.method.signals import compute_base_signals


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    data = {"x": x, "y": torch.randint(0, 3, (12,), generator=g)}
    model = torch.nn.Linear(5, 3).double()
    moved = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        for p, q in zip(moved.parameters(), model.parameters(), strict=True):
            p.copy_(q + 0.01 * torch.randn(q.shape, generator=g, dtype=torch.float64))
    xi = torch.rand(12, generator=g, dtype=torch.float64)
    return ClassificationTask(), model, moved, data, xi


def test_paper_form_of_the_hessian_objective(setup):
    task, model, moved, data, xi = setup
    objective = Objective()
    base = compute_base_signals(model, task, data, objective)
    value = per_example_objective(task, objective, moved(data["x"]), data, base, xi)
    loss, loss0 = task.per_example_loss(moved, data), task.per_example_loss(model, data)
    # Paper eq. (5): L − L0 − 2ξ ⟨∇L(θ0), θ − θ0⟩, the inner product in parameter space.
    flat0, flat1 = FlatModel(model, task), FlatModel(moved, task)
    grads = per_example_gradients(flat0, data, task.loss_from_outputs)
    first_order = grads @ (flat1.theta - flat0.theta)
    torch.testing.assert_close(value, loss - loss0 - 2 * xi * first_order)


@pytest.mark.parametrize("variant", ["efim", "trak"])
def test_table_1_forms(setup, variant):
    task, model, moved, data, xi = setup
    objective = Objective(variant=variant, gamma=0.7, rho=0.3)
    base = compute_base_signals(model, task, data, objective)
    value = per_example_objective(task, objective, moved(data["x"]), data, base, xi)
    fn = task.margin_from_outputs if variant == "trak" else task.loss_from_outputs
    now, then = fn(moved(data["x"]), data), fn(model(data["x"]), data)
    flat0, flat1 = FlatModel(model, task), FlatModel(moved, task)
    first_order = per_example_gradients(flat0, data, fn) @ (flat1.theta - flat0.theta)
    expected = 0.7 * 0.5 * (now - then) ** 2 - 0.3 * (2 * xi - 1) * first_order
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(("variant", "power"), [("hessian", 1), ("efim", 2), ("trak", 2)])
def test_black_box_forms_use_values_only(setup, variant, power):
    task, _, moved, data, xi = setup
    objective = Objective(variant=variant, access="black_box", gamma=2.0)
    out = moved(data["x"])
    value = per_example_objective(task, objective, out, data, None, xi)
    fn = task.margin_from_outputs if variant == "trak" else task.loss_from_outputs
    expected = 2.0 * (fn(out, data) if power == 1 else 0.5 * fn(out, data) ** 2)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("labels", ["observed", "sampled"])
def test_gradient_at_the_base_model_is_the_perturbation_alone(setup, labels):
    # The curvature part is stationary at θ0 for any γ: copies move only because of ρ·u.
    task, model, _, data, xi = setup
    objective = Objective(gamma=0.3, rho=0.5, labels=labels)
    base = compute_base_signals(model, task, data, objective)
    params = dict(model.named_parameters())

    def total(p):
        out = functional_call(model, p, (data["x"],))
        return per_example_objective(task, objective, out, data, base, xi).sum()

    got = grad(total)(params)
    direction = (
        task.logit_noise(base["outputs"], data, xi)
        if labels == "sampled"
        else (2 * xi - 1).unsqueeze(1) * base["grad"]
    )
    # ∂/∂W of −ρ Σ ⟨u_i, W x_i + b⟩ = −ρ Σ u_i x_iᵀ.
    torch.testing.assert_close(got["weight"], -0.5 * direction.T @ data["x"])
    torch.testing.assert_close(got["bias"], -0.5 * direction.sum(0))


def test_sampled_label_noise_has_the_softmax_covariance():
    task = ClassificationTask()
    logits = torch.tensor([[1.0, -0.5, 0.3]], dtype=torch.float64)
    xi = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    noise = task.logit_noise(logits.expand(20000, 3), {}, xi)
    p = logits.softmax(1)[0]
    torch.testing.assert_close(
        noise.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-3, rtol=0
    )
    cov = noise.T @ noise / noise.shape[0]
    torch.testing.assert_close(cov, torch.diag(p) - torch.outer(p, p), atol=1e-3, rtol=0)


def test_antithetic_sampled_labels_mirror_each_other():
    task = ClassificationTask()
    logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64).expand(4, 2)
    xi = torch.tensor([0.1, 0.3, 0.7, 0.9], dtype=torch.float64)
    noise = task.logit_noise(logits, {}, xi)
    torch.testing.assert_close(noise[:2], -noise.flip(0)[:2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "kfac"}, "variant must be one of"),
        ({"access": "grey"}, "access must be one of"),
        ({"labels": "sampled", "access": "black_box", "variant": "efim"}, "plain NLL"),
        ({"gamma": 0.0}, "gamma must be > 0"),
        ({"rho": -1.0}, "rho must be > 0"),
    ],
)
def test_bad_objectives_are_refused(kwargs, match):
    with pytest.raises(DaunceError, match=match):
        Objective(**kwargs)


def test_a_confident_example_keeps_its_loss_in_float32():
    task = ClassificationTask()
    logits = torch.tensor([[30.0, 0.0, -5.0], [2.0, 1.0, 0.5], [0.0, 40.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    loss = task.loss_from_outputs(logits, {"y": labels})
    exact = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    exact[0] = torch.log1p(torch.exp(torch.tensor(-30.0, dtype=torch.float64)) + math.exp(-35))
    exact[2] = torch.log1p(torch.tensor(math.exp(-40) + math.exp(-39), dtype=torch.float64))
    assert (loss > 0).all()  # F.cross_entropy gives exactly 0 for rows 0 and 2 in float32
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
    assert torch.nn.functional.cross_entropy(logits, labels, reduction="none")[0] == 0

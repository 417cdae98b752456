"""Small synthetic problems with closed-form influence: linear and logistic regression.

Used by the tests and ``bench/bench_convergence.py`` to check DAUNCE against the exact forms of
`daunce_core.baselines.exact`, and handy for users who want to see the method converge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from daunce_core.access.task import ClassificationTask, RegressionTask, Task
from daunce_core.data import ExampleSet


@dataclass
class Problem:
    """A model to attribute, with its data and the L2 strength it was trained with."""

    model: nn.Module
    task: Task
    train: ExampleSet
    queries: ExampleSet
    l2: float


def _features(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=generator, dtype=torch.float64)


def linear_regression(
    n: int = 120, m: int = 20, d: int = 4, l2: float = 1e-2, noise: float = 0.5, seed: int = 0
) -> Problem:
    """Least squares on Gaussian features, fitted exactly (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = _features(n + m, d, g)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64)
    y = y + noise * torch.randn(n + m, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    return _fitted(model, RegressionTask(), {"x": x, "y": y}, n, l2)


def logistic_regression(
    n: int = 120, m: int = 20, d: int = 4, classes: int = 3, l2: float = 1e-2, seed: int = 0
) -> Problem:
    """Softmax regression with labels drawn from a true linear model, fitted exactly (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = _features(n + m, d, g)
    logits = x @ torch.randn(d, classes, generator=g, dtype=torch.float64)
    y = torch.multinomial(logits.softmax(dim=1), 1, generator=g).squeeze(1)
    model = nn.Linear(d, classes).double()
    return _fitted(model, ClassificationTask(), {"x": x, "y": y}, n, l2)


def _fitted(model: nn.Module, task: Task, data: ExampleSet, n: int, l2: float) -> Problem:
    train = {k: v[:n] for k, v in data.items()}
    queries = {k: v[n:] for k, v in data.items()}
    fit_exact(model, task, train, l2)
    return Problem(model=model, task=task, train=train, queries=queries, l2=l2)


def fit_exact(model: nn.Module, task: Task, data: ExampleSet, l2: float) -> nn.Module:
    """Minimise mean loss + ``½·l2·‖θ‖²`` to machine precision with full-batch L-BFGS."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        max_iter=1000,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.per_example_loss(model, data).mean()
        loss = loss + 0.5 * l2 * sum(p.pow(2).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def retrained_outcomes(problem: Problem, subsets, steps: int = 300, lr: float = 0.5):
    """LDS ground truth of a problem: its model refitted on each subset, outcomes ``[M, 1, m]``.

    Full-batch training from a fresh model to the (unique, convex) optimum of each subset, with
    the problem's own L2; see `daunce_core.evaluation.lds.retrain_on_subsets`.
    """
    import copy

    from daunce_core.access.torch_module.models import seeded
    from daunce_core.evaluation.lds import retrain_on_subsets
    from daunce_core.method.config import TrainConfig

    def fresh(seed: int) -> nn.Module:
        model = copy.deepcopy(problem.model)
        with seeded(seed):
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return model

    size = int(subsets.sum(axis=1)[0])
    recipe = TrainConfig(lr=lr, steps=steps, batch_size=size, schedule="constant")
    return retrain_on_subsets(
        fresh, problem.task, problem.train, problem.queries, subsets, recipe, seeds=1, l2=problem.l2
    )

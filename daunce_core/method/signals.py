"""Base signals: what the white-box objectives need from the base model, computed once.

For every training example: the base logits ``g0_i``, the base value ``v0_i`` (loss, or margin
for ``trak``) and its logit-gradient ``d_i = ∂v_i/∂g`` at ``θ0`` (paper eq. (5), second line).
Because each ``v_i`` depends only on its own logits, one backward pass of ``Σ_i v_i`` through
the logits gives every ``d_i`` at once — no per-example parameter gradients are ever formed.
"""

from __future__ import annotations

import torch
from torch import nn

from daunce_core.access.task import Task, check_per_example
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.method.objectives import Objective, objective_value

BaseSignals = dict[str, torch.Tensor]


def _batch_signals(task: Task, objective: Objective, model: nn.Module, batch) -> BaseSignals:
    with torch.no_grad():
        outputs = task.outputs(model, batch)
    logits = outputs.detach().requires_grad_(True)
    value = objective_value(task, objective, logits, batch)
    check_per_example(value, logits.shape[0], "the loss (or margin) of the task")
    (grad,) = torch.autograd.grad(value.sum(), logits)
    return {"outputs": outputs.detach(), "grad": grad.detach(), "value": value.detach()}


def compute_base_signals(
    model: nn.Module,
    task: Task,
    data: ExampleSet,
    objective: Objective,
    batch_size: int = 512,
) -> BaseSignals:
    """Base logits, values and logit-gradients of every example in ``data``.

    Args:
        model: the base model ``θ0`` (put in ``eval()`` mode by the caller).
        task: the model protocol.
        data: the training examples, ``n`` rows.
        objective: decides whether the value is the loss or the margin.
        batch_size: examples per forward pass.

    Returns:
        ``{"outputs": [n, ...], "grad": [n, ...], "value": [n]}``, detached.
    """
    parts = [
        _batch_signals(task, objective, model, take(data, rows))
        for rows in batch_slices(num_examples(data), batch_size)
    ]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

"""Loss evaluation of every perturbed copy on every example (Algorithm 1, after line 5).

The result is the ``[G, n]`` block of rows ``k`` of the loss matrices ``A`` (train, losses) and
``B`` (queries, measurement), streamed over batches of examples so that memory stays bounded by
``G × batch_size`` outputs whatever the number of examples.
"""

from __future__ import annotations

import torch
from torch import nn

from daunce_core.access.task import Measurement, Task, check_per_example
from daunce_core.access.torch_module.stacked import Stacked, copy_outputs_fn, map_copies
from daunce_core.data import ExampleSet, batch_slices, num_examples, take


def evaluate_copies(
    model: nn.Module,
    task: Task,
    params: Stacked,
    data: ExampleSet,
    *,
    measurement: Measurement | str = "loss",
    batch_size: int = 1024,
    vectorize: bool = True,
) -> torch.Tensor:
    """Measurement of each copy on each example, shape ``[G, n]`` in the model's dtype.

    Args:
        model: the model whose parameters ``params`` replace (its other weights are shared).
        task: the model protocol.
        params: trainable parameters of ``G`` copies, ``name -> [G, ...]``.
        data: the examples, ``n`` rows.
        measurement: ``"loss"`` or ``"margin"`` (stored negated: lower is better), or
            ``"error"`` (0/1, `Task.outcome`) for retraining experiments.
        batch_size: examples per forward pass (all copies see the same batch).
        vectorize: evaluate the copies at once with ``vmap`` or one after another.
    """
    outputs_of = copy_outputs_fn(model, task)

    def measure(copy_params, batch) -> torch.Tensor:
        values = task.outcome(outputs_of(copy_params, batch), batch, measurement)
        return check_per_example(values, next(iter(batch.values())).shape[0], "the measurement")

    with torch.no_grad():
        blocks = [
            map_copies(measure, (params,), vectorize, shared=(take(data, rows),))
            for rows in batch_slices(num_examples(data), batch_size)
        ]
    return torch.cat(blocks, dim=1)

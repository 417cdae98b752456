"""Many copies of one model as stacked parameters, run at once with ``torch.func``.

A group of ``G`` copies is a dict ``name -> Tensor[G, ...]`` of the task's trainable parameters;
everything else (frozen weights, buffers) is shared with the model itself. A forward pass of all
copies is ``vmap`` over ``functional_call``, each copy on its own batch; because the copies never
mix, gradients of the summed objective are each copy's own gradients, and any element-wise
optimiser (SGD, AdamW) stepping the stacked tensors is exactly one optimiser per copy.

``vectorize=False`` runs the copies one after another through the same functional path: the
reference the vectorised path is tested against, and the fallback for models that ``vmap`` cannot
trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from daunce_core.access.task import Task, TaskModule
from daunce_core.data import ExampleSet
from daunce_core.errors import TaskError

Stacked = dict[str, torch.Tensor]


def trainable_names(model: nn.Module, task: Task) -> list[str]:
    """Names of the task's trainable parameters, checked against ``model.named_parameters()``."""
    names = list(task.trainable_parameters(model))
    known = dict(model.named_parameters())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise TaskError(
            f"trainable_parameters must return a non-empty dict keyed by names from "
            f"model.named_parameters(); unknown or missing: {unknown or 'none returned'}."
        )
    return names


def stack_copies(model: nn.Module, names: list[str], count: int) -> Stacked:
    """``count`` copies of the named parameters as leaf tensors ``[count, ...]``."""
    params = dict(model.named_parameters())
    return {
        name: params[name].detach().unsqueeze(0).repeat(count, *[1] * params[name].dim())
        for name in names
    }


def copy_outputs_fn(model: nn.Module, task: Task) -> Callable:
    """A function ``(params_of_one_copy, batch) -> logits`` over the model's functional form."""
    wrapper = TaskModule(model, task)

    def outputs(params: dict[str, torch.Tensor], batch: ExampleSet) -> torch.Tensor:
        return functional_call(wrapper, {f"m.{k}": v for k, v in params.items()}, (batch,))

    return outputs


def map_copies(fn: Callable, args: tuple, vectorize: bool, shared: tuple = ()) -> torch.Tensor:
    """Apply ``fn(*copy_args, *shared)`` to each copy's slice of ``args``; stack the results.

    Every tensor in ``args`` (or pytree of tensors, or None) is stacked on dim 0 over copies;
    ``shared`` arguments are the same for every copy. ``vectorize=True`` uses ``vmap``;
    ``False`` loops over copies (the reference path).
    """
    if vectorize:
        in_dims = tuple(None if a is None else 0 for a in args) + (None,) * len(shared)
        return vmap(fn, in_dims=in_dims)(*args, *shared)
    count = _leading(args[0])
    return torch.stack([fn(*_index(args, g), *shared) for g in range(count)])


def _leading(tree) -> int:
    if isinstance(tree, dict):
        return _leading(next(iter(tree.values())))
    return int(tree.shape[0])


def _index(tree, g: int):
    if isinstance(tree, dict):
        return {k: _index(v, g) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_index(v, g) for v in tree)
    return None if tree is None else tree[g]

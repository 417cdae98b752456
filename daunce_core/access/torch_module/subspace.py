"""Reflected copies and the curvature in their span, for the subspace-curvature scores (DESIGN §1).

For trained copies ``θ^k = θ0 + Δ_k`` (stacked parameters), `reflected_losses` measures each copy,
its reflection ``θ0 − Δ_k`` (loss evaluation only, no training) and the base model on a set of
examples, and `output_changes` gives, on the curvature examples
(`daunce_core.method.subspace.curvature_rows`), what the output-space part of ``Q`` is made of:

    ``(1/n_c) Σ_i dz_ikᵀ H_i dz_il``  with  ``dz_ik = (g(θ0+Δ_k, x_i) − g(θ0−Δ_k, x_i)) / 2``,

``H_i`` the loss's Hessian in the outputs at ``θ0`` (`Task.output_hessian_product`). The central
difference of the logits is ``J_i Δ_k + O(‖Δ‖³)`` (exact for models linear in their parameters),
the same order as the central loss changes, and needs forward passes only, where a
Jacobian-vector product would cost a forward-mode pass per copy. `parameter_gram` adds
``Δ_kᵀ Δ_l`` for the proximal ``λ``. In memory (`output_gram_of`) the Gram is accumulated batch by
batch; the pipeline stores each copy's ``dz`` and ``H dz`` so that copies trained by different
tasks meet in one ``Q`` (`daunce_core.storage.reflections`).

Memory: the outputs of all K copies (and of their reflections) on one batch of examples,
``2 × K × batch_size × outputs`` values, and ``K × K`` for the Gram.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Task
from daunce_core.access.torch_module.stacked import Stacked, copy_outputs_fn, map_copies
from daunce_core.access.torch_module.training import TrainedCopies
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.method.subspace import ReflectedLosses, output_gram


def reflect(params: Stacked, anchor: dict[str, torch.Tensor]) -> Stacked:
    """The reflected copies ``θ0 − Δ_k = 2θ0 − θ^k``, ``name -> [K, ...]``."""
    return {name: 2 * anchor[name] - p for name, p in params.items()}


def parameter_gram(params: Stacked, anchor: dict[str, torch.Tensor]) -> np.ndarray:
    """``Δ_kᵀ Δ_l`` of the copies' displacements from ``anchor``, ``[K, K]`` float64."""
    flat = torch.cat(
        [(p - anchor[name]).reshape(p.shape[0], -1).double() for name, p in params.items()], dim=1
    )
    return (flat @ flat.T).cpu().numpy()


def merge_trained(groups: list[TrainedCopies]) -> TrainedCopies:
    """Groups of trained copies as one, in order (their parameters stacked).

    The groups of one run share their learning rate (``lr: auto`` is resolved once per run);
    residuals and per-copy steps are concatenated where every group measured them.
    """

    def joined(name: str):
        parts = [getattr(g, name) for g in groups]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    rates = {g.lr for g in groups}
    return TrainedCopies(
        params={name: torch.cat([g.params[name] for g in groups]) for name in groups[0].params},
        diverged=np.concatenate([g.diverged for g in groups]),
        steps=max(g.steps for g in groups),
        final_objective=np.concatenate([g.final_objective for g in groups]),
        lr=rates.pop() if len(rates) == 1 else None,
        residual=joined("residual"),
        copy_steps=joined("copy_steps"),
        judged=all(g.judged for g in groups),
    )


def reflected_losses(
    model: nn.Module,
    task: Task,
    params: Stacked,
    anchor: dict[str, torch.Tensor],
    data: ExampleSet,
    *,
    measurement: str = "loss",
    batch_size: int = 1024,
    group_size: int = 32,
    vectorize: bool = True,
) -> ReflectedLosses:
    """Measurements of the copies, their reflections and ``θ0`` on ``data`` (float64).

    Args:
        model: the base model ``θ0`` (its trainable parameters are ``anchor``).
        task: the model protocol.
        params: the trained copies, ``name -> [K, ...]``.
        anchor: ``θ0``'s trainable parameters, ``name -> [...]``.
        data: the examples, ``n`` rows.
        measurement: ``"loss"`` or ``"margin"`` (`Task.measure`).
        batch_size: examples per forward pass.
        group_size: copies per vectorised forward pass.
        vectorize: run a group of copies with ``vmap`` (False: one after another).
    """
    outputs_of = copy_outputs_fn(model, task)
    copies, mirrored = params, reflect(params, anchor)
    plus, minus, base = [], [], []
    with torch.no_grad():
        for rows in batch_slices(num_examples(data), batch_size):
            batch = take(data, rows)
            for values, stacked in ((plus, copies), (minus, mirrored)):
                outputs = _all_outputs(outputs_of, stacked, batch, group_size, vectorize)
                values.append(_measure(task, outputs, batch, measurement, vectorize))
            base.append(task.measure(task.outputs(model, batch), batch, measurement))
    return ReflectedLosses(
        plus=_numpy(torch.cat(plus, dim=1)),
        minus=_numpy(torch.cat(minus, dim=1)),
        base=_numpy(torch.cat(base)),
    )


def output_changes(
    model: nn.Module,
    task: Task,
    params: Stacked,
    anchor: dict[str, torch.Tensor],
    data: ExampleSet,
    *,
    group_size: int = 32,
    vectorize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each copy's central output change on ``data`` and the loss's Hessian applied to it.

    ``dz_ik = (g(θ0+Δ_k, x_i) − g(θ0−Δ_k, x_i)) / 2`` and ``H_i dz_ik`` (``H_i`` at ``θ0``,
    `Task.output_hessian_product`), both ``[K, B, ...]`` in the outputs' dtype: one batch of
    examples. ``Σ_i dz_ikᵀ H_i dz_il`` over the examples of
    `daunce_core.method.subspace.curvature_rows` is ``Q``'s output part
    (`daunce_core.method.subspace.output_gram`).
    """
    outputs_of = copy_outputs_fn(model, task)
    with torch.no_grad():
        plus = _all_outputs(outputs_of, params, data, group_size, vectorize)
        minus = _all_outputs(outputs_of, reflect(params, anchor), data, group_size, vectorize)
        changes = (plus - minus) / 2
        curved = task.output_hessian_product(task.outputs(model, data), data, changes)
    return changes, curved.to(changes.dtype)


def output_gram_of(
    model: nn.Module,
    task: Task,
    params: Stacked,
    anchor: dict[str, torch.Tensor],
    data: ExampleSet,
    *,
    batch_size: int = 1024,
    group_size: int = 32,
    vectorize: bool = True,
) -> np.ndarray:
    """``(1/n_c) Σ_i dz_ikᵀ H_i dz_il`` over ``data`` (the curvature examples), ``[K, K]``.

    Accumulated batch by batch (`output_changes`), so only one batch's changes are held.
    """
    count = next(iter(params.values())).shape[0]
    gram = np.zeros((count, count))
    for rows in batch_slices(num_examples(data), batch_size):
        changes, curved = output_changes(
            model,
            task,
            params,
            anchor,
            take(data, rows),
            group_size=group_size,
            vectorize=vectorize,
        )
        gram += output_gram(changes.cpu().numpy(), curved.cpu().numpy()) * changes.shape[1]
    return gram / num_examples(data)


def outputs_per_example(model: nn.Module, task: Task, data: ExampleSet) -> int:
    """How many output values one example has (classes; tokens × vocabulary for an LM)."""
    with torch.no_grad():
        outputs = task.outputs(model, take(data, slice(0, 1)))
    return int(outputs[0].numel())


def _device(anchor: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(anchor.values())).device


def _all_outputs(outputs_of, params: Stacked, batch, group_size: int, vectorize: bool):
    """Outputs of every copy on ``batch``, ``[K, B, ...]``, ``group_size`` copies at a time."""
    count = next(iter(params.values())).shape[0]
    return torch.cat(
        [
            map_copies(
                outputs_of,
                ({n: p[start : start + group_size] for n, p in params.items()},),
                vectorize,
                shared=(batch,),
            )
            for start in range(0, count, group_size)
        ]
    )


def _measure(task: Task, outputs: torch.Tensor, batch, measurement: str, vectorize: bool):
    """``[K, B]`` measurement of each copy's outputs ``[K, B, ...]``."""
    return map_copies(
        lambda out, b: task.measure(out, b, measurement), (outputs,), vectorize, shared=(batch,)
    )


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.double().cpu().numpy()

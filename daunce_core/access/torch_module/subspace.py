"""Reflected copies and the curvature in their span, for the subspace-curvature scores (DESIGN §1).

For trained copies ``θ^k = θ0 + Δ_k`` (stacked parameters), the reflection ``θ0 − Δ_k`` (`reflect`)
is measured like any copy (loss evaluation only, no training), and `output_changes` gives, on
the curvature examples (`daunce_core.method.subspace.curvature_rows`), what the output-space part
of ``Q`` is made of:

    ``(1/n_c) Σ_i dz_ikᵀ H_i dz_il``  with  ``dz_ik = (g(θ0+Δ_k, x_i) − g(θ0−Δ_k, x_i)) / 2``,

``H_i`` the loss's Hessian in the outputs at ``θ0`` (`Task.output_hessian_product`). The central
difference of the logits is ``J_i Δ_k + O(‖Δ‖³)`` (exact for models linear in their parameters),
the same order as the central loss changes, and needs forward passes only, where a
Jacobian-vector product would cost a forward-mode pass per copy. The task factors each ``dz``
(`Task.curvature_factors`: ``(dz, H dz)``, or for a causal LM a compressed factor of its tokens ×
vocabulary) so that ``Q``'s output part is a sum of inner products. `parameter_gram` adds
``Δ_kᵀ Δ_l`` for the proximal ``λ``. In memory (`output_gram_of`) the Gram is accumulated batch by
batch; the pipeline stores each copy's factors so that copies trained by different tasks meet in
one ``Q`` (`daunce_core.storage.reflections`).

Memory: the outputs of ``group_size`` copies (and of their reflections) on one batch of
examples, and ``K × K`` for the Gram.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Task
from daunce_core.access.torch_module.stacked import Stacked, copy_outputs_fn, map_copies
from daunce_core.access.torch_module.training import TrainedCopies
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.method.subspace import output_gram


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
    """The curvature factors of each copy's central output change on ``data`` (one batch).

    ``dz_ik = (g(θ0+Δ_k, x_i) − g(θ0−Δ_k, x_i)) / 2``, then `Task.curvature_factors` at θ0's
    outputs: ``(dz, H dz)`` for most tasks, a compressed factor for a causal LM's tokens ×
    vocabulary. Both ``[K, B, ...]``; the sum of ``left_k · right_l`` over the examples of
    `daunce_core.method.subspace.curvature_rows` is ``Q``'s output part
    (`daunce_core.method.subspace.output_gram`). Copies are run ``group_size`` at a time, so at
    most ``3 × group_size × B`` outputs are held.
    """
    outputs_of = copy_outputs_fn(model, task)
    mirrored = reflect(params, anchor)
    count = next(iter(params.values())).shape[0]
    lefts, rights = [], []
    with torch.no_grad():
        base = task.outputs(model, data)
        for start in range(0, count, group_size):
            group = slice(start, start + group_size)
            plus, minus = (
                map_copies(
                    outputs_of,
                    ({n: p[group] for n, p in stacked.items()},),
                    vectorize,
                    shared=(data,),
                )
                for stacked in (params, mirrored)
            )
            left, right = task.curvature_factors(base, data, (plus - minus) / 2)
            lefts.append(left)
            rights.append(right.to(left.dtype))
    return torch.cat(lefts), torch.cat(rights)


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

    Accumulated batch by batch (`output_changes`), so only one batch's factors are held.
    """
    count = next(iter(params.values())).shape[0]
    gram = np.zeros((count, count))
    for rows in batch_slices(num_examples(data), batch_size):
        left, right = output_changes(
            model,
            task,
            params,
            anchor,
            take(data, rows),
            group_size=group_size,
            vectorize=vectorize,
        )
        gram += output_gram(left.cpu().numpy(), right.cpu().numpy()) * left.shape[1]
    return gram / num_examples(data)


def factor_shape(model: nn.Module, task: Task, data: ExampleSet) -> tuple[int, ...]:
    """The shape of one example's curvature factor (`Task.curvature_factors`).

    The outputs' own shape for most tasks (classes); tokens × a few vocabulary columns for a
    causal LM.
    """
    probe = take(data, slice(0, 1))
    with torch.no_grad():
        outputs = task.outputs(model, probe)
        left, _ = task.curvature_factors(outputs, probe, torch.zeros_like(outputs)[None])
    return tuple(left.shape[2:])

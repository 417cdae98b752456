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
(`Task.curvature_factors`: ``(dz, H dz)``, or for a causal LM its coordinates in the output
head's column space, the model's width per token) so that ``Q``'s output part is a sum of
inner products. `parameter_gram` adds ``Δ_kᵀ Δ_l`` for the proximal ``λ``. In memory
(`reflected_pass`) the Gram is accumulated batch by batch from the same forward passes that
measure the copies and their reflections; the pipeline stores each copy's factors so that copies
trained by different tasks meet in one ``Q`` (`daunce_core.storage.reflections`).

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
    outputs: ``(dz, H dz)`` for most tasks, the model's width per token for a causal LM. Both
    ``[K, B, ...]``; the sum of ``left_k · right_l`` over the examples of
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
            plus, minus = _both(outputs_of, (params, mirrored), group, data, vectorize)
            left, right = task.curvature_factors(base, data, (plus - minus) / 2)
            lefts.append(left)
            rights.append(right.to(left.dtype))
    return torch.cat(lefts), torch.cat(rights)


def reflected_pass(
    model: nn.Module,
    task: Task,
    params: Stacked,
    anchor: dict[str, torch.Tensor],
    data: ExampleSet,
    *,
    measurement: str = "loss",
    curvature: np.ndarray | None = None,
    batch_size: int = 1024,
    group_size: int = 32,
    vectorize: bool = True,
) -> tuple[ReflectedLosses, np.ndarray | None]:
    """One pass over ``data``: the copies', their reflections' and θ0's measurements, and ``Q``.

    Each batch's outputs of a group of copies and of their reflections give both their
    measurements and, on the rows ``curvature`` names (indices into ``data``, e.g.
    `daunce_core.method.subspace.curvature_rows`), the factors of ``dz`` (`output_changes`'
    formula), accumulated into ``(1/n_c) Σ_i dz_ikᵀ H_i dz_il``: the forward passes are shared.

    Returns:
        The measurements (float64, `ReflectedLosses`) and the ``[K, K]`` output Gram (None
        without ``curvature``).
    """
    outputs_of = copy_outputs_fn(model, task)
    mirrored = reflect(params, anchor)
    count = next(iter(params.values())).shape[0]
    marked = np.zeros(num_examples(data), dtype=bool)
    if curvature is not None:
        marked[curvature] = True
    plus, minus, base = [], [], []
    gram = np.zeros((count, count))
    with torch.no_grad():
        for rows in batch_slices(num_examples(data), batch_size):
            batch = take(data, rows)
            outputs = task.outputs(model, batch)
            base.append(task.measure(outputs, batch, measurement))
            keep = torch.from_numpy(np.flatnonzero(marked[rows])).to(outputs.device)
            ups, downs, lefts, rights = [], [], [], []
            for start in range(0, count, group_size):
                group = slice(start, start + group_size)
                up, down = _both(outputs_of, (params, mirrored), group, batch, vectorize)
                ups.append(_measure(task, up, batch, measurement, vectorize))
                downs.append(_measure(task, down, batch, measurement, vectorize))
                if len(keep):
                    change = (up.index_select(1, keep) - down.index_select(1, keep)) / 2
                    left, right = task.curvature_factors(
                        outputs.index_select(0, keep), take(batch, keep), change
                    )
                    lefts.append(left)
                    rights.append(right.to(left.dtype))
            plus.append(torch.cat(ups))
            minus.append(torch.cat(downs))
            if lefts:
                left, right = torch.cat(lefts), torch.cat(rights)
                gram += output_gram(left.cpu().numpy(), right.cpu().numpy()) * len(keep)
    losses = ReflectedLosses(
        plus=_numpy(torch.cat(plus, dim=1)),
        minus=_numpy(torch.cat(minus, dim=1)),
        base=_numpy(torch.cat(base)),
    )
    return losses, None if curvature is None else gram / max(1, int(marked.sum()))


def _both(outputs_of, pair: tuple[Stacked, Stacked], group: slice, batch, vectorize: bool):
    """Outputs of copies ``group`` of both stacks of ``pair`` (copies, reflections) on ``batch``."""
    return tuple(
        map_copies(
            outputs_of, ({n: p[group] for n, p in stacked.items()},), vectorize, shared=(batch,)
        )
        for stacked in pair
    )


def _measure(task: Task, outputs: torch.Tensor, batch, measurement: str, vectorize: bool):
    """``[G, B]`` measurement of each copy's outputs ``[G, B, ...]``."""
    return map_copies(
        lambda out, b: task.measure(out, b, measurement), (outputs,), vectorize, shared=(batch,)
    )


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.double().cpu().numpy()


def factor_shape(model: nn.Module, task: Task, data: ExampleSet) -> tuple[int, ...]:
    """The shape of one example's curvature factor (`Task.curvature_factors`).

    The outputs' own shape for most tasks (classes); tokens × the model's width for a causal
    LM whose head the copies leave alone.
    """
    probe = take(data, slice(0, 1))
    with torch.no_grad():
        outputs = task.outputs(model, probe)
        left, _ = task.curvature_factors(outputs, probe, torch.zeros_like(outputs)[None])
    return tuple(left.shape[2:])

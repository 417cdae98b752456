"""Reflected copies and the curvature in their span, for the subspace-curvature scores (DESIGN §1).

For trained copies ``θ^k = θ0 + Δ_k`` (stacked parameters), `reflected_losses` measures each copy,
its reflection ``θ0 − Δ_k`` (loss evaluation only, no training) and the base model on a set of
examples and, on the training set, accumulates in the same forward passes the output-space part
of ``Q`` (`daunce_core.method.subspace`):

    ``(1/n) Σ_i dz_ikᵀ H_i dz_il``  with  ``dz_ik = (g(θ0+Δ_k, x_i) − g(θ0−Δ_k, x_i)) / 2``,

``H_i`` the loss's Hessian in the outputs at ``θ0`` (`Task.output_hessian_product`). The central
difference of the logits is ``J_i Δ_k + O(‖Δ‖³)`` (exact for models linear in their parameters),
the same order as the central loss changes, and free: the reflected copies' logits are computed
for their losses anyway, where a Jacobian-vector product would cost a forward-mode pass per copy.
`parameter_gram` adds ``Δ_kᵀ Δ_l`` for the proximal ``λ``.

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
from daunce_core.method.subspace import ReflectedLosses


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
    """Groups of trained copies as one, in order (their parameters stacked)."""
    return TrainedCopies(
        params={name: torch.cat([g.params[name] for g in groups]) for name in groups[0].params},
        diverged=np.concatenate([g.diverged for g in groups]),
        steps=max(g.steps for g in groups),
        final_objective=np.concatenate([g.final_objective for g in groups]),
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
    curvature: bool = True,
) -> tuple[ReflectedLosses, np.ndarray | None]:
    """Measurements of the copies, their reflections and ``θ0`` on ``data``, and the output Gram.

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
        curvature: also accumulate the output Gram (the training set's; not the queries').

    Returns:
        `ReflectedLosses` (float64), and ``(1/n) Σ_i dz_ikᵀ H_i dz_il``, ``[K, K]`` float64
        (None unless ``curvature``).
    """
    outputs_of = copy_outputs_fn(model, task)
    copies, mirrored = params, reflect(params, anchor)
    count = next(iter(params.values())).shape[0]
    plus, minus, base = [], [], []
    gram = torch.zeros(count, count, dtype=torch.float64, device=_device(anchor))
    with torch.no_grad():
        for rows in batch_slices(num_examples(data), batch_size):
            batch = take(data, rows)
            out_plus = _all_outputs(outputs_of, copies, batch, group_size, vectorize)
            out_minus = _all_outputs(outputs_of, mirrored, batch, group_size, vectorize)
            out_base = task.outputs(model, batch)
            plus.append(_measure(task, out_plus, batch, measurement, vectorize))
            minus.append(_measure(task, out_minus, batch, measurement, vectorize))
            base.append(task.measure(out_base, batch, measurement))
            if curvature:
                gram += _output_gram(task, out_plus, out_minus, out_base, batch)
    losses = ReflectedLosses(
        plus=_numpy(torch.cat(plus, dim=1)),
        minus=_numpy(torch.cat(minus, dim=1)),
        base=_numpy(torch.cat(base)),
    )
    return losses, (gram.cpu().numpy() / num_examples(data) if curvature else None)


def _output_gram(task: Task, out_plus, out_minus, out_base, batch) -> torch.Tensor:
    """``Σ_{i ∈ batch} dz_ikᵀ H_i dz_il`` with central logit changes ``dz``, ``[K, K]``."""
    count = out_plus.shape[0]
    dz = (out_plus - out_minus) / 2
    curved = task.output_hessian_product(out_base, batch, dz)
    return dz.reshape(count, -1).double() @ curved.reshape(count, -1).double().T


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

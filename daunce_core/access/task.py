"""The `Task` protocol: how the white-box access kinds reach a torch model's outputs and losses.

A white-box model access (`daunce_core.access.torch_module`, and the Hugging Face + LoRA kind)
touches the model in exactly four ways (paper §3.1, eq. (5) and Table 1):

1. **outputs** ``g(θ, x)``: the logits (any shape ``[B, ...]``), from which everything else follows;
2. **per-example loss** ``L_i = loss_from_outputs(g, batch)``: shape ``[B]``, never reduced over
   the batch (the covariance needs one loss per example and per perturbed copy);
3. **query measurement**: the loss by default, or the negated TRAK margin
   ``−f = −log(p/(1−p))`` (negated so that lower is better for both, and a positive score always
   means "training on this example helps the query");
4. **trainable parameters**: the tensors the perturbed copies may move.

A `Task` names these with two required methods (`outputs`, `loss_from_outputs`) and optional
hooks with safe defaults: `margin_from_outputs` (needed by the ``trak`` variant and the margin
measurement), `logit_noise` (needed by sampled-label perturbations), `output_hessian_product` and
`curvature_factors` (the subspace-curvature scores; autograd by default) and
`trainable_parameters`.

A Hugging Face causal LM with LoRA meets the same protocol: ``outputs`` returns the
answer-token logits ``[B, T, V]``; ``loss_from_outputs`` the mean token NLL over the answer
tokens (masked by the batch's label mask), so it stays one value per example;
``trainable_parameters`` returns only the LoRA adapter weights; ``logit_noise`` samples one token
per answer position from the base model's softmax. Black-box models (a fine-tuning API, prompt
optimisation) do not use a `Task`: their `daunce_core.access.base.ModelAccess` kind queries
losses itself, and its `Capabilities` refuse the white-box objectives.

Every method must be a pure function of its arguments (no ``.item()``, no data-dependent Python
control flow, no in-place updates of module state) so that many perturbed copies can run at once
under ``torch.func.vmap``; models are put in ``eval()`` mode for perturbed training and loss
evaluation (no dropout noise, frozen batch-norm statistics).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from daunce_core.data import ExampleSet
from daunce_core.errors import TaskError

Measurement = Literal["loss", "margin"]
MEASUREMENTS = ("loss", "margin")
OUTCOMES = ("loss", "margin", "error")
"""What retraining experiments record per query (`Task.outcome`): the two measurements, and
``error`` (1 if the query is answered wrongly, else 0) for subset removal."""


class Task(ABC):
    """How DAUNCE computes outputs, losses and measurements of a model on a batch."""

    @abstractmethod
    def outputs(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Logits of ``model`` on ``batch``: shape ``[B, ...]`` with B the batch size."""

    @abstractmethod
    def loss_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Per-example negative log-likelihood from logits: shape ``[B]``, not reduced."""

    def margin_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """TRAK margin ``f = log(p/(1−p))`` of the correct answer, shape ``[B]``.

        Optional: needed by the ``trak`` variant and by ``measurement="margin"``.
        """
        raise TaskError(
            f"{type(self).__name__} defines no margin_from_outputs; implement it to use the "
            "'trak' variant or measurement='margin', or use variant='hessian'/'efim' with "
            "measurement='loss'."
        )

    def logit_noise(
        self, outputs: torch.Tensor, batch: ExampleSet, xi: torch.Tensor
    ) -> torch.Tensor:
        """Zero-mean noise in logit space drawn from the model's own predictive distribution.

        Optional: needed by sampled-label (Gauss-Newton) perturbations, DESIGN §1. Returns the
        loss gradient with respect to ``outputs`` at a label sampled from ``p(·|x)`` minus its
        mean, shape like ``outputs``; its covariance is the output Hessian of the loss, so the
        perturbed copies' spread follows the Gauss-Newton curvature. ``xi`` (shape ``[B]``,
        uniform on (0, 1)) is the only randomness: use it (inverse CDF) so draws stay
        deterministic and antithetic pairs (ξ, 1−ξ) give opposite samples.
        """
        raise TaskError(
            f"{type(self).__name__} defines no logit_noise; implement it to use "
            "labels='sampled', or use labels='observed'."
        )

    def correct_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Whether each example is answered correctly, bool ``[B]``.

        Optional: needed by the subset-removal evaluation (DESIGN §2), which counts the queries
        that become wrong when their most influential training examples are removed.
        """
        raise TaskError(
            f"{type(self).__name__} defines no correct_from_outputs; implement it (e.g. argmax "
            "equals the label) to run the subset-removal evaluation."
        )

    def output_hessian_product(
        self, outputs: torch.Tensor, batch: ExampleSet, vectors: torch.Tensor
    ) -> torch.Tensor:
        """The loss's Hessian in the outputs times ``vectors``: ``H_i v_i`` for every example i.

        Used by the subspace-curvature scores (DESIGN §1), whose curvature is the Gauss-Newton
        ``Σ_i J_iᵀ H_i J_i`` in the copies' span. ``outputs``: the base model's logits
        ``[B, ...]``, where ``H_i = ∂²L_i/∂g²`` is taken; ``vectors``: ``[G, B, ...]``, G
        directions in output space for each example. Returns ``[G, B, ...]``.

        Default: forward-over-reverse autograd of `loss_from_outputs` (each example's loss
        depends on its own outputs only, so the Hessian of the summed loss is block-diagonal);
        `ClassificationTask` and `RegressionTask` have closed forms.
        """
        outputs = outputs.detach()

        def gradient(out: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda o: self.loss_from_outputs(o, batch).sum())(out)

        def product(vector: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(gradient, (outputs,), (vector.to(outputs.dtype),))[1]

        return torch.stack([product(vector) for vector in vectors])

    def curvature_factors(
        self, outputs: torch.Tensor, batch: ExampleSet, changes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two factors of output changes whose inner product is ``dz_kᵀ H_i dz_l``.

        The subspace-curvature scores' ``Q`` has the output part ``(1/n) Σ_i dz_ikᵀ H_i dz_il``
        (DESIGN §1). ``outputs``: the base model's logits ``[B, ...]``; ``changes``: ``dz``,
        ``[G, B, ...]``. Returns ``(left, right)``, both ``[G, B, ...]`` of one shape (not
        necessarily the outputs'), such that the sum over the trailing dimensions of
        ``left[k, i] * right[l, i]`` is ``dz_ikᵀ H_i dz_il``: what the pipeline stores per copy.

        Default: ``(dz, H dz)`` (`output_hessian_product`). A task with many outputs per example
        may store less (`daunce_core.access.hf_lora.tasks.CausalLMTask`: the model's width per
        token instead of the vocabulary).
        """
        return changes, self.output_hessian_product(outputs, batch, changes).to(changes.dtype)

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Parameters the perturbed copies train, keyed by ``model.named_parameters()`` name."""
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def per_example_loss(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Per-example loss of ``model`` on ``batch``, shape ``[B]``."""
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def measure(
        self, outputs: torch.Tensor, batch: ExampleSet, measurement: Measurement
    ) -> torch.Tensor:
        """Query measurement from logits: the loss, or the negated margin (lower is better)."""
        if measurement == "loss":
            return self.loss_from_outputs(outputs, batch)
        if measurement == "margin":
            return -self.margin_from_outputs(outputs, batch)
        raise TaskError(f"measurement must be one of {MEASUREMENTS}; got {measurement!r}.")

    def outcome(self, outputs: torch.Tensor, batch: ExampleSet, kind: str) -> torch.Tensor:
        """A retraining outcome (`OUTCOMES`), lower is better: a measurement, or the 0/1 error."""
        if kind == "error":
            return (~self.correct_from_outputs(outputs, batch)).to(outputs.dtype)
        if kind not in OUTCOMES:
            raise TaskError(f"outcome must be one of {OUTCOMES}; got {kind!r}.")
        return self.measure(outputs, batch, kind)


class TaskModule(nn.Module):
    """The model under its task as one module: ``forward(batch) = task.outputs(m, batch)``.

    The one wrapper every functional path uses (vectorised copies, exact influence, the peers):
    ``functional_call`` swaps the parameters the task's outputs use (named ``m.<name>``), and
    kronfluence never finds a tracked layer at the root (it swaps layers inside their parents).
    """

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.m, self.task = model, task

    def forward(self, batch: ExampleSet) -> torch.Tensor:
        """The task's outputs of the wrapped model on ``batch``."""
        return self.task.outputs(self.m, batch)


def check_per_example(values: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
    """Raise a `TaskError` unless ``values`` holds one value per example (shape ``[B]``)."""
    if values.dim() == 1 and values.shape[0] == batch_size:
        return values
    hint = (
        " It looks reduced over the batch: compute it with reduction='none'."
        if values.dim() == 0
        else ""
    )
    raise TaskError(
        f"{what} must return one value per example, shape [{batch_size}]; got shape "
        f"{tuple(values.shape)}.{hint}"
    )


PRECISE_BELOW = 1e-5
"""Cross-entropy below which `ClassificationTask` computes it as ``softplus(−margin)``: there
``F.cross_entropy``'s float32 rounding (about 6e-8) is over 1% of the loss."""


class ClassificationTask(Task):
    """Softmax classifier: cross-entropy loss, TRAK margin, sampled labels from the softmax.

    Args:
        input_key: column holding the model input (default ``"x"``).
        label_key: column holding integer class labels (default ``"y"``).
    """

    def __init__(self, input_key: str = "x", label_key: str = "y") -> None:
        self.input_key = input_key
        self.label_key = label_key

    def outputs(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return model(batch[self.input_key])

    def loss_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Cross-entropy per example, ``[B]``, precise at any margin.

        ``F.cross_entropy`` computes ``−log_softmax``, which returns exactly 0 in float32 once
        an example's margin passes about 17: a confident example would lose its loss, and
        with it every score. Below `PRECISE_BELOW` the loss is ``softplus(−margin) =
        log1p(e^{−m})`` instead, which keeps its relative precision at any margin; above it,
        ``F.cross_entropy``'s own value (bit for bit what a copy trained in any group gets).
        """
        loss = F.cross_entropy(outputs, batch[self.label_key], reduction="none")
        precise = F.softplus(-self.margin_from_outputs(outputs, batch))
        return torch.where(loss > PRECISE_BELOW, loss, precise)

    def margin_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """``g_y − logsumexp_{c≠y} g_c`` = ``log(p_y/(1−p_y))``, ``[B]``."""
        label = batch[self.label_key].unsqueeze(-1)
        correct = outputs.gather(-1, label).squeeze(-1)
        others = outputs.scatter(-1, label, float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def correct_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Arg-max class equals the label, ``[B]``."""
        return outputs.argmax(dim=-1) == batch[self.label_key]

    def logit_noise(
        self, outputs: torch.Tensor, batch: ExampleSet, xi: torch.Tensor
    ) -> torch.Tensor:
        """``p − e_ŷ`` with ``ŷ`` drawn from ``softmax(outputs)`` by inverse CDF at ``ξ``."""
        probs = outputs.softmax(dim=-1)
        sampled = (probs.cumsum(dim=-1) < xi.unsqueeze(-1)).sum(dim=-1)
        sampled = sampled.clamp(max=outputs.shape[-1] - 1)
        classes = torch.arange(outputs.shape[-1], device=outputs.device)
        return probs - (classes == sampled.unsqueeze(-1)).to(probs.dtype)

    def output_hessian_product(
        self, outputs: torch.Tensor, batch: ExampleSet, vectors: torch.Tensor
    ) -> torch.Tensor:
        """``(diag(p) − p pᵀ) v`` with ``p = softmax(outputs)``: cross-entropy's Hessian."""
        probs = outputs.softmax(dim=-1)
        weighted = probs * vectors
        return weighted - probs * weighted.sum(dim=-1, keepdim=True)


class RegressionTask(Task):
    """Least squares: loss ``½‖g − y‖²`` (Gaussian NLL with unit variance, up to a constant).

    There is no margin. Sampled-label noise is standard normal (the output Hessian is 1).

    Args:
        input_key: column holding the model input (default ``"x"``).
        target_key: column holding the real-valued targets, shape ``[n]`` or ``[n, d]``.
    """

    def __init__(self, input_key: str = "x", target_key: str = "y") -> None:
        self.input_key = input_key
        self.target_key = target_key

    def outputs(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Predictions, reshaped like the targets."""
        target = batch[self.target_key]
        return model(batch[self.input_key]).reshape(target.shape)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """``½‖g − y‖²`` per example, ``[B]``."""
        residual = (outputs - batch[self.target_key]).reshape(outputs.shape[0], -1)
        return 0.5 * residual.pow(2).sum(dim=-1)

    def logit_noise(
        self, outputs: torch.Tensor, batch: ExampleSet, xi: torch.Tensor
    ) -> torch.Tensor:
        """Standard normal noise by inverse CDF at ``ξ``; scalar targets only."""
        if outputs[0].numel() != 1:
            raise TaskError(
                "RegressionTask.logit_noise covers scalar targets only (one uniform per example); "
                "for vector targets subclass it and draw one normal per output dimension."
            )
        z = math.sqrt(2.0) * torch.erfinv(2.0 * xi.to(outputs.dtype) - 1.0)
        return z.reshape(outputs.shape)

    def output_hessian_product(
        self, outputs: torch.Tensor, batch: ExampleSet, vectors: torch.Tensor
    ) -> torch.Tensor:
        """``v`` itself: the Hessian of ``½‖g − y‖²`` in ``g`` is the identity."""
        return vectors


def task_from_spec(spec: dict) -> Task:
    """Build a `Task` from a config mapping.

    ``{"kind": "classification", "input": "x", "label": "y"}``,
    ``{"kind": "regression", "input": "x", "target": "y"}``, or
    ``{"kind": "factory", "factory": "package.module:function", "kwargs": {...}}``.
    """
    spec = dict(spec)
    kind = spec.pop("kind", "classification")
    if kind == "classification":
        return ClassificationTask(spec.pop("input", "x"), spec.pop("label", "y"), **spec)
    if kind == "regression":
        return RegressionTask(spec.pop("input", "x"), spec.pop("target", "y"), **spec)
    if kind in ("causal_lm", "sequence_classification"):
        from daunce_core.access.hf_lora.access import make_task

        return make_task(kind)
    if kind == "factory":
        import importlib

        module_name, _, function = spec["factory"].partition(":")
        return getattr(importlib.import_module(module_name), function)(**spec.get("kwargs", {}))
    raise TaskError(
        "task kind must be 'classification', 'regression', 'factory', 'causal_lm' or "
        f"'sequence_classification'; got {kind!r}."
    )

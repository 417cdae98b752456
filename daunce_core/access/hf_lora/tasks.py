"""The `Task` protocol for Hugging Face models: causal LMs (completion tokens) and classifiers.

`CausalLMTask` meets the protocol of `daunce_core.access.task` with the completion tokens as the
"classes": outputs are the logits at the completion positions only, ``[B, C, V]`` (the backbone's
last hidden states gathered at ``target_pos``, then the output head), the per-example loss is
the mean token NLL over the completion (padding masked), the margin the mean token TRAK margin,
and sampled-label noise draws one token per completion position from the model's own softmax
(DESIGN §1). The head runs in float32 (or the run's float64) even when the backbone runs in
bfloat16 on a GPU: the white-box objective works with small logit *differences*, which bfloat16
would round away.

The base model's logits are never stored for all examples: `CausalLMTask.hidden` gives the last
hidden states at the completion positions (``[n, C, H]``, small), from which
`CausalLMTask.base_signals` recomputes a batch's base logits, values and logit-gradients in
closed form (no autograd, so it runs under ``vmap``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daunce_core.access.task import ClassificationTask, Task
from daunce_core.data import ExampleSet

TOKEN_COLUMNS = ("input_ids", "attention_mask", "target_pos", "target_ids", "target_mask")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a ``...ForCausalLM`` model (``model.transformer``, ``model.model``)."""
    return getattr(model, model.base_model_prefix)


def _lora(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


class CausalLMTask(Task):
    """A causal LM on prompt + completion examples (`daunce_core.access.hf_lora.text`).

    Args:
        head_dtype: dtype of the output head and everything after it (float32 by default).
    """

    def __init__(self, head_dtype: torch.dtype = torch.float32) -> None:
        self.head_dtype = head_dtype
        self.basis: torch.Tensor | None = None
        """An orthonormal basis ``[V, H]`` of the output head's columns (`head_basis`): set by
        the access when the copies leave the head alone (`curvature_factors`)."""

    def hidden(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Last hidden states at the completion positions, ``[B, C, H]``.

        No attention mask is passed: padding is on the right and attention is causal, so no
        position at or before a completion token ever sees a pad token. Without the mask, and
        with embeddings given in place of token ids, the forward pass has no data-dependent
        branches, so copies with batches of their own run under ``vmap``.
        """
        embeds = model.get_input_embeddings()(batch["input_ids"])
        states = backbone(model)(inputs_embeds=embeds).last_hidden_state
        index = batch["target_pos"].unsqueeze(-1).expand(-1, -1, states.shape[-1])
        return states.gather(1, index)

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, V]`` of hidden states through the output head, in ``head_dtype``."""
        layer = model.get_output_embeddings()
        bias = None if layer.bias is None else layer.bias.to(self.head_dtype)
        return F.linear(hidden.to(self.head_dtype), layer.weight.to(self.head_dtype), bias)

    def outputs(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Logits at the completion positions, ``[B, C, V]``."""
        return self.head(model, self.hidden(model, batch))

    @staticmethod
    def _weights(batch: ExampleSet, like: torch.Tensor) -> torch.Tensor:
        """Per-token weights ``mask / count``: a token's share of its example's mean."""
        mask = batch["target_mask"].to(like.dtype)
        return mask / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)

    def loss_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Mean NLL over each example's completion tokens, ``[B]``."""
        logp = outputs.log_softmax(dim=-1)
        nll = -logp.gather(-1, batch["target_ids"].unsqueeze(-1)).squeeze(-1)
        return (nll * self._weights(batch, nll)).sum(dim=-1)

    def _token_margins(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        target = batch["target_ids"].unsqueeze(-1)
        correct = outputs.gather(-1, target).squeeze(-1)
        others = outputs.scatter(-1, target, float("-inf"))
        return correct - torch.logsumexp(others, dim=-1)

    def margin_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Mean over completion tokens of the token's TRAK margin ``log(p/(1−p))``, ``[B]``."""
        margins = self._token_margins(outputs, batch)
        return (margins * self._weights(batch, margins)).sum(dim=-1)

    def correct_from_outputs(self, outputs: torch.Tensor, batch: ExampleSet) -> torch.Tensor:
        """Whether greedy decoding gives the completion: every token is the arg-max, ``[B]``."""
        hit = (outputs.argmax(dim=-1) == batch["target_ids"]) | (batch["target_mask"] == 0)
        return hit.all(dim=-1)

    def logit_noise(
        self, outputs: torch.Tensor, batch: ExampleSet, xi: torch.Tensor
    ) -> torch.Tensor:
        """``w_t·(p_t − e_ŷt)``: one token per completion position drawn from the softmax.

        ``xi`` is ``[B, C]`` (one uniform per token, inverse CDF) or ``[B]`` (the same uniform
        for every token of an example). ``w_t`` is the token's weight in the mean loss, so the
        noise is the loss gradient at the sampled tokens minus its mean.
        """
        probs = outputs.softmax(dim=-1)
        u = xi if xi.dim() == 2 else xi.unsqueeze(-1).expand(probs.shape[:-1])
        sampled = (probs.cumsum(dim=-1) < u.unsqueeze(-1).to(probs.dtype)).sum(dim=-1)
        sampled = sampled.clamp(max=outputs.shape[-1] - 1)
        onehot = F.one_hot(sampled, outputs.shape[-1]).to(probs.dtype)
        return (probs - onehot) * self._weights(batch, probs).unsqueeze(-1)

    def base_signals(
        self, logits: torch.Tensor, batch: ExampleSet, margin: bool
    ) -> dict[str, torch.Tensor]:
        """Base value and its logit-gradient in closed form: ``{"outputs", "grad", "value"}``.

        ``margin`` selects the TRAK margin (the ``trak`` variant) instead of the loss.
        """
        weights = self._weights(batch, logits).unsqueeze(-1)
        target = batch["target_ids"].unsqueeze(-1)
        if margin:
            value = self.margin_from_outputs(logits, batch)
            others = logits.scatter(-1, target, float("-inf")).softmax(dim=-1)
            onehot = torch.zeros_like(logits).scatter(-1, target, 1.0)
            grad = (onehot - others) * weights
        else:
            value = self.loss_from_outputs(logits, batch)
            onehot = torch.zeros_like(logits).scatter(-1, target, 1.0)
            grad = (logits.softmax(dim=-1) - onehot) * weights
        return {"outputs": logits, "grad": grad, "value": value}

    def output_hessian_product(
        self, outputs: torch.Tensor, batch: ExampleSet, vectors: torch.Tensor
    ) -> torch.Tensor:
        """``w_t (diag(p_t) − p_t p_tᵀ) v_t`` per completion token: the mean NLL's Hessian."""
        probs = outputs.softmax(dim=-1)
        weighted = probs * vectors.to(probs.dtype)
        product = weighted - probs * weighted.sum(dim=-1, keepdim=True)
        return product * self._weights(batch, probs).unsqueeze(-1)

    def curvature_factors(
        self, outputs: torch.Tensor, batch: ExampleSet, changes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Uᵀ dz, Uᵀ H dz)`` per completion token: vocabulary-sized changes in hidden width.

        When the copies leave the output head alone (LoRA on the blocks), a logit change is the
        head applied to a hidden-state change, ``dz = W dh``, so it lies in the span of the
        head's columns; with ``U`` an orthonormal basis of that span (`basis`, ``[V, H]``),
        ``dz_kᵀ H dz_l = (Uᵀ dz_k)ᵀ (Uᵀ H dz_l)`` exactly. Each token's factor is ``H`` values
        (the model's width) instead of ``V``. Without a basis (the copies adapt the head):
        ``(dz, H dz)`` in full.
        """
        curved = self.output_hessian_product(outputs, batch, changes).to(changes.dtype)
        if self.basis is None:
            return changes, curved
        basis = self.basis.to(device=changes.device, dtype=changes.dtype)
        return changes @ basis, curved @ basis

    def cache(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """What the base model's logits are recomputed from: the hidden states, ``[B, C, H]``."""
        return self.hidden(model, batch)

    def from_cache(self, model: nn.Module, cached: torch.Tensor) -> torch.Tensor:
        """Base logits ``[B, C, V]`` from cached hidden states (through the output head)."""
        return self.head(model, cached)

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA adapter's weights only."""
        return _lora(model)


class SequenceClassifierTask(ClassificationTask):
    """A ``...ForSequenceClassification`` model on tokenised texts, labels in ``y``."""

    def __init__(self) -> None:
        super().__init__(input_key="input_ids", label_key="y")

    def outputs(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """Class logits ``[B, C]`` (float32 for the loss)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits

    def base_signals(
        self, logits: torch.Tensor, batch: ExampleSet, margin: bool
    ) -> dict[str, torch.Tensor]:
        """Base value and its logit-gradient in closed form (cross-entropy or TRAK margin)."""
        label = batch["y"].unsqueeze(-1)
        onehot = torch.zeros_like(logits).scatter(-1, label, 1.0)
        if margin:
            others = logits.scatter(-1, label, float("-inf")).softmax(dim=-1)
            return {
                "outputs": logits,
                "grad": onehot - others,
                "value": self.margin_from_outputs(logits, batch),
            }
        return {
            "outputs": logits,
            "grad": logits.softmax(dim=-1) - onehot,
            "value": self.loss_from_outputs(logits, batch),
        }

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA adapter's weights only."""
        return _lora(model)

    def cache(self, model: nn.Module, batch: ExampleSet) -> torch.Tensor:
        """The base model's class logits themselves, ``[B, C]`` (small enough to keep)."""
        return self.outputs(model, batch)

    def from_cache(self, model: nn.Module, cached: torch.Tensor) -> torch.Tensor:
        """The cached base logits."""
        return cached


def head_basis(model: nn.Module, trainable: list[str]) -> torch.Tensor | None:
    """An orthonormal basis ``[V, H]`` of a causal LM's output-head columns (float32 QR).

    None when a ``trainable`` parameter is in the head (its logit changes then leave the span).
    """
    head = model.get_output_embeddings()
    owned = {id(p) for p in head.parameters()}
    params = dict(model.named_parameters())
    if any(id(params[name]) in owned for name in trainable):
        return None
    basis, _ = torch.linalg.qr(head.weight.detach().float())
    return basis

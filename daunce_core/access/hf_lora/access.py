"""The ``hf_lora`` model access: perturbed copies of a Hugging Face model as LoRA adapters.

The paper's headline use (§4.2): each copy ``k`` is a LoRA adapter on the base model θ0, trained
from the same starting adapter (``B = 0``, so the copy starts at θ0) on the perturbed objective
of ``(seed, k)``. Everything else is the torch kind's (`TorchModuleAccess`): the same draws,
copy trainer (``vmap`` over the stacked adapter weights of a group, or one copy after another),
evaluation and loss arrays. What differs is what a Hugging Face model needs:

- the examples are text, tokenised once (`daunce_core.access.hf_lora.text`), and a causal LM's
  outputs are the logits at the completion positions only (`CausalLMTask`);
- the base signals are never stored as logits: the base model's last hidden states at the
  completion positions (``[n, C, H]``) are cached, and each batch's base logits, values and
  logit-gradients are recomputed from them through the output head (the authors' trick);
- sampled labels draw one token per completion position (`token_uniforms`);
- on a GPU the frozen weights are bfloat16 while the adapter and the output head stay in the
  run's dtype; one loaded model serves every copy of a group;
- a copy is saved as a peft adapter state dict (safetensors, ``base_model.model.…`` keys, so
  ``peft.set_peft_model_state_dict`` loads it).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from daunce_core.access.base import Capabilities
from daunce_core.access.hf_lora.models import (
    BUILDING,
    LoraSpec,
    add_lora,
    context_window,
    load_model,
)
from daunce_core.access.hf_lora.tasks import CausalLMTask, SequenceClassifierTask, head_basis
from daunce_core.access.hf_lora.text import encode_completions, encode_texts
from daunce_core.access.torch_module.access import TorchModuleAccess, _on
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.data import batch_slices, num_examples, take
from daunce_core.errors import DaunceError
from daunce_core.method.config import ComputeConfig, DaunceConfig
from daunce_core.method.draws import token_uniforms
from daunce_core.method.objectives import per_example_objective

LOGIT_BUDGET = 1 << 23
"""Logit entries one evaluation forward pass may form per copy (32 MiB in float32): caps the
rows per pass of a large-vocabulary model whatever ``eval_batch_size`` says."""


def make_task(kind: str):
    """The `Task` of a Hugging Face task kind (``causal_lm`` or ``sequence_classification``)."""
    if kind == "causal_lm":
        return CausalLMTask()
    if kind == "sequence_classification":
        return SequenceClassifierTask()
    raise DaunceError(
        f"task.kind must be 'causal_lm' or 'sequence_classification' for model.access hf_lora; "
        f"got {kind!r}."
    )


def encode(task_spec: Mapping, tokenizer, columns: Mapping, max_length: int, where: str) -> dict:
    """Tokenise one split's text columns as the task spec names them."""
    kind = task_spec.get("kind")
    if kind == "causal_lm":
        return encode_completions(
            tokenizer,
            columns[task_spec.get("prompt", "prompt")],
            columns[task_spec.get("completion", "completion")],
            max_length=max_length,
            where=where,
            chat=bool(task_spec.get("chat", False)),
            separator=task_spec.get("separator", " "),
        )
    return encode_texts(
        tokenizer,
        columns[task_spec.get("text", "text")],
        columns[task_spec.get("label", "y")],
        max_length=max_length,
        where=where,
    )


class HFLoraAccess(TorchModuleAccess):
    """A Hugging Face causal LM or sequence classifier; copies are LoRA adapters on θ0.

    White-box and deterministic: every objective of the torch kind (the paper's form with
    observed labels, sampled labels per completion token, ``efim``, ``trak``, black-box).

    Args:
        model: θ0, a ``…ForCausalLM`` or ``…ForSequenceClassification`` model (not modified).
        task: `CausalLMTask` or `SequenceClassifierTask`.
        train: encoded training examples (`encode`), ``n`` rows.
        queries: encoded queries, ``m`` rows.
        config: the run's configuration.
        lora: the copies' adapter.
        base_l2: the default proximal λ (on the adapter's weights); 0 for most LMs.
        compute: how copies are computed (group size, vectorisation, batch size, device).
    """

    kind = "hf_lora"
    capabilities = Capabilities(
        gradients=True, fine_tuning=True, custom_objective=True, deterministic=True
    )

    def __init__(
        self,
        model: nn.Module,
        task,
        train: Mapping[str, torch.Tensor],
        queries: Mapping[str, torch.Tensor],
        config: DaunceConfig,
        lora: LoraSpec | None = None,
        base_l2: float = 0.0,
        compute: ComputeConfig | None = None,
    ) -> None:
        self.check(config.objective)
        self.config, self.task = config, task
        self.compute = compute or ComputeConfig()
        device = self.compute.torch_device
        dtype = config.torch_dtype
        frozen = torch.bfloat16 if device.type == "cuda" else dtype
        with BUILDING:
            self.model = copy.deepcopy(model).to(device=device, dtype=frozen).eval()
            add_lora(self.model, lora or LoraSpec(), seed=config.seed)
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
        self.train_set = _on(dict(train), device)
        self.query_set = _on(dict(queries), device)
        self.names = trainable_names(self.model, task)
        if isinstance(task, CausalLMTask):
            task.head_dtype = dtype
        self._probe()
        self.signals = None
        if config.objective.needs_base_signals:
            self.signals = {"cache": self._cache(self.train_set)}
        params = dict(self.model.named_parameters())
        self.anchor = {name: params[name].detach().clone() for name in self.names}
        self.prox = base_l2 if config.prox is None else config.prox
        self.l2 = config.objective.gamma * self.prox
        self._auto_lr: float | None = None  # `recipe`: lr 'auto' (SGD adapters) once per run

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        task_spec: Mapping,
        train: Mapping,
        queries: Mapping,
        config: DaunceConfig,
        *,
        lora: LoraSpec | None = None,
        gguf_file: str | None = None,
        adapter: str | None = None,
        compute: ComputeConfig | None = None,
        base_l2: float = 0.0,
    ) -> HFLoraAccess:
        """The access of a model folder on text columns (``train``/``queries``: name → values).

        ``task_spec`` is the run's ``task`` section (kind, column names, ``chat``).
        """
        from daunce_core.access.hf_lora.base import num_labels

        kind = task_spec.get("kind")
        task = make_task(kind)
        model, tokenizer = load_model(
            folder,
            kind,
            gguf_file=gguf_file,
            adapter=adapter,
            num_labels=num_labels(task_spec, train, queries),
        )
        window = context_window(model)
        return cls(
            model,
            task,
            encode(task_spec, tokenizer, train, window, "data.train"),
            encode(task_spec, tokenizer, queries, window, "data.queries"),
            config,
            lora=lora,
            base_l2=base_l2,
            compute=compute,
        )

    def _probe(self) -> None:
        """Fail early if the model cannot compute losses (token widths may differ by split)."""
        probe = take(self.train_set, slice(0, 2))
        with torch.no_grad():
            losses = self.task.per_example_loss(self.model, probe)
        if losses.shape != (num_examples(probe),):
            raise DaunceError(
                f"the model gave losses of shape {tuple(losses.shape)}; expected one per example."
            )

    def _rows_per_pass(self) -> int:
        """Examples per evaluation pass: ``eval_batch_size``, capped by `LOGIT_BUDGET`."""
        if getattr(self, "_rows", None) is None:
            probe = take(self.train_set, slice(0, 1))
            with torch.no_grad():
                width = self.task.outputs(self.model, probe)[0].numel()
            self._rows = max(1, min(self.compute.eval_batch_size, LOGIT_BUDGET // max(width, 1)))
        return self._rows

    def _cache(self, data) -> torch.Tensor:
        """What the base logits are recomputed from, for every example (hidden states)."""
        rows = self._rows_per_pass()
        with torch.no_grad():
            parts = [
                self.task.cache(self.model, take(data, part))
                for part in batch_slices(num_examples(data), rows)
            ]
        return torch.cat(parts)

    def draws(self, ks: Sequence[int]):
        """The torch kind's draws; sampled labels of a causal LM get one uniform per token."""
        draws = super().draws(ks)
        if self.config.objective.labels != "sampled" or "target_mask" not in self.train_set:
            return draws
        width = self.train_set["target_mask"].shape[1]
        return [
            dataclasses.replace(d, xi=token_uniforms(d, self.config.seed, width)) for d in draws
        ]

    def _vectorize_training(self) -> bool:
        """Whether a group trains under ``vmap``: a causal LM's does (``compute.vectorize``).

        A classifier's copies train one after another: its attention mask makes the forward
        pass data-dependent.
        """
        return self.compute.vectorize and isinstance(self.task, CausalLMTask)

    def _objective(self, outputs, batch, side):
        base = None
        if self.signals is not None:
            with torch.no_grad():
                logits = self.task.from_cache(self.model, side["cache"])
                base = self.task.base_signals(logits, batch, self.config.objective.uses_margin)
        return per_example_objective(
            self.task, self.config.objective, outputs, batch, base, side["xi"]
        )

    def _factor_shape(self) -> tuple[int, ...]:
        """The torch kind's, once a causal LM's head basis is set (`CausalLMTask.basis`).

        Every subspace path asks this first; the basis (a QR of the ``V × H`` head) is made only
        for subspace scores.
        """
        if isinstance(self.task, CausalLMTask) and getattr(self, "_factors", None) is None:
            self.task.basis = head_basis(self.model, self.names)
        return super()._factor_shape()

    def _vectorize_evaluation(self) -> bool:
        """Copies are evaluated together under ``vmap`` on a GPU only.

        On a CPU, vmap evaluates 2.5x slower than a loop over the copies (its activations fall
        out of cache; bench/bench_lm.py: 7.9k against 22k tokens/s at G = 8).
        """
        return self.compute.vectorize and self.compute.torch_device.type == "cuda"

    def copy_key(self, name: str) -> str:
        """A saved copy is a peft adapter state dict: ``base_model.model.…``, no ``.default``."""
        return "base_model.model." + name.replace(".default", "")

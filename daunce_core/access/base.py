"""Model access: how DAUNCE reaches a model, whatever kind it is (DESIGN §3, "Access kinds").

The paper changes only the Perturb and Train steps between access kinds (§5); everything else —
draws from ``(seed, k)``, the ``K × n`` / ``K × m`` loss arrays, scoring, exports, lineage, LDS
and removal — is shared. So one protocol, `ModelAccess`, stands between the pipeline and a model.
Each kind is one module under ``daunce_core/access/`` that brings its own copy trainer and loss
evaluation, and declares what it can do (`Capabilities`):

=====================  ==============================  =====================================
kind                   module                          capabilities
=====================  ==============================  =====================================
``torch``              `access.torch_module`           all four
``hf_lora``            `access.hf_lora`                all four (LoRA adapters as copies)
``api``                `access.api`                    fine-tuning, bootstrap (not deterministic)
``prompt``             `access.prompt`                 custom objective over loss queries,
                                                       bootstrap, deterministic
=====================  ==============================  =====================================

`check_objective` refuses, before anything runs, an objective that needs a capability the
model lacks, naming what is missing and what would work instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from daunce_core.errors import DaunceError
from daunce_core.method.objectives import Objective


@dataclass(frozen=True)
class Capabilities:
    """What a kind of model access can do.

    Attributes:
        gradients: logits and their gradients are reachable (the white-box first-order term).
        fine_tuning: the model's parameters (or an adapter) can be trained into copies.
        custom_objective: the copy trainer minimises an objective DAUNCE defines (the
            white-box objectives, and the squared ``efim``/``trak`` black-box forms); a
            fine-tuning API minimises plain NLL only.
        deterministic: the same ``(seed, k)`` always gives the same copy, so a lost copy may be
            trained again; a paid, non-deterministic service's copy may not.
        bootstrap: the kind fine-tunes copies with plain NLL on completions sampled from θ0
            (the black-box sampled-label form, a parametric bootstrap: DESIGN §1).
    """

    gradients: bool
    fine_tuning: bool
    custom_objective: bool
    deterministic: bool
    bootstrap: bool = False


def requirements(objective: Objective) -> dict[str, str]:
    """The capabilities ``objective`` needs, each with the reason.

    A name ``"a|b"`` needs either capability: the paper's black-box form trains copies on
    random subsets by plain fine-tuning, or by any trainer of a custom objective over loss
    queries (prompt optimisation).
    """
    if objective.access == "white_box":
        return {
            "gradients": "the white-box objectives' first-order term needs the base logits",
            "fine_tuning": "white-box copies are trained by gradient steps on parameters",
            "custom_objective": "the white-box objective is not plain NLL",
        }
    if objective.labels == "sampled":
        return {
            "bootstrap": (
                "black-box sampled labels fine-tune each copy on completions sampled from θ0"
            )
        }
    if objective.variant != "hessian":
        return {
            "custom_objective": (
                f"the black-box {objective.variant!r} objective (a squared loss) is not plain NLL"
            )
        }
    return {"fine_tuning|custom_objective": "black-box copies must be trained somehow"}


def lacks(capabilities: Capabilities, objective: Objective) -> dict[str, str]:
    """The requirements of ``objective`` that ``capabilities`` do not meet."""
    return {
        name: why
        for name, why in requirements(objective).items()
        if not any(getattr(capabilities, part) for part in name.split("|"))
    }


def check_objective(kind: str, capabilities: Capabilities, objective: Objective) -> None:
    """Raise a `DaunceError` naming what a ``kind`` model cannot do for ``objective``."""
    missing = lacks(capabilities, objective)
    if not missing:
        return
    reasons = "; ".join(f"{name.replace('|', ' or ')} ({why})" for name, why in missing.items())
    usable = [
        f"access {o.access}, variant {o.variant}"
        + (", labels sampled" if o.labels == "sampled" else "")
        for o in (
            Objective(),
            Objective(access="black_box"),
            Objective(access="black_box", variant="efim"),
            Objective(access="black_box", labels="sampled"),
        )
        if not lacks(capabilities, o)
    ]
    hint = f" It can run: {'; '.join(usable)}." if usable else ""
    raise DaunceError(
        f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind!r} model cannot run objective "
        f"variant={objective.variant!r}, "
        f"access={objective.access!r}: it lacks {reasons}.{hint}"
    )


@dataclass
class CopyLosses:
    """Loss rows of some perturbed copies.

    Attributes:
        ks: the copy indices, ``[G]``.
        train: losses on the training set, ``[G, n]`` float64 (rows of ``A``); NaN if diverged.
        query: measurements on the queries, ``[G, m]`` float64 (rows of ``B``); NaN if diverged.
        diverged: ``[G]`` bool.
    """

    ks: np.ndarray
    train: np.ndarray
    query: np.ndarray
    diverged: np.ndarray


class CopiesFailed(DaunceError):
    """Some copies of a group could not be trained; the others were, and are kept.

    Attributes:
        ks: the copies that succeeded, in the order of ``trained``.
        trained: the kind's handle of those copies.
        errors: the error of each copy that did not, by copy index.
    """

    def __init__(self, ks: list[int], trained: Any, errors: dict[int, Exception]) -> None:
        first = next(iter(errors.values()))
        more = f" (and {len(errors) - 1} more cop{'y' if len(errors) == 2 else 'ies'})"
        super().__init__(str(first) + (more if len(errors) > 1 else ""))
        self.ks, self.trained, self.errors = ks, trained, errors


class CopyJournal(Protocol):
    """Where a kind that submits external jobs records them before waiting (per-copy records).

    A fine-tuning API's copy trainer asks `job_id` first and resumes polling a recorded job
    instead of submitting a second one; it calls `record_job` as soon as a job is created. A
    prompt search keeps its state in `state_file` and its progress in `record_job_state`.
    """

    def job_id(self, k: int) -> str | None:
        """The external job recorded for copy ``k``, if any."""

    def record_job(self, k: int, job_id: str, counts: dict[str, int] | None = None) -> None:
        """Record copy ``k``'s external job durably, before waiting for it (one per attempt).

        ``counts``: what creating it cost, recorded in the same write.
        """

    def jobs(self, k: int) -> list[str]:
        """Every external job recorded for copy ``k``, oldest first (its attempts)."""

    def record_job_state(self, k: int, state: str, message: str | None = None) -> None:
        """Record the last state the server reported for copy ``k``'s current job."""

    def record_usage(self, k: int, counts: dict[str, int]) -> None:
        """Add ``counts`` (requests, tokens, jobs) to what copy ``k``'s record says it cost."""

    def recorded_usage(self, k: int) -> dict[str, int]:
        """What copy ``k``'s record says it cost so far (over attempts and processes)."""

    def state_file(self, k: int) -> Path:
        """Where a kind keeps copy ``k``'s work in progress (a prompt search's state).

        The kind writes it atomically as it goes and reads it when the copy starts again, so
        a killed run resumes mid-copy.
        """


class ModelAccess(ABC):
    """One kind of model access: trains perturbed copies by index and evaluates their losses.

    Copy ``k`` depends only on ``(seed, k)`` (for deterministic kinds), so copies can be trained
    in any grouping, on any worker, in any order. Trained copies are an opaque handle of the
    kind (stacked parameters, adapters, fine-tuned model ids) that `save_copy` writes to one
    file per copy and `load_copies` reads back.
    """

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    copy_suffix: ClassVar[str] = ".safetensors"
    """The file name ending of a saved copy (`save_copy`)."""

    @property
    @abstractmethod
    def num_train(self) -> int:
        """n, the number of training examples."""

    @property
    @abstractmethod
    def num_queries(self) -> int:
        """m, the number of queries."""

    @abstractmethod
    def train(self, ks: Sequence[int], journal: CopyJournal | None = None) -> Any:
        """Train copies ``ks`` from the base model; return the kind's handle of them.

        ``journal`` records external job ids (kinds that submit jobs must use it).
        """

    @abstractmethod
    def evaluate(self, ks: Sequence[int], trained: Any) -> CopyLosses:
        """Loss rows of trained copies ``ks`` on every training example and query."""

    @abstractmethod
    def measure_queries(self, trained: Any, start: int) -> np.ndarray:
        """Measurements of trained copies on queries ``start:`` only, ``[G, m − start]``."""

    @abstractmethod
    def save_copy(self, trained: Any, g: int, path: Path) -> None:
        """Write the ``g``-th copy of ``trained`` to ``path`` (atomically)."""

    @abstractmethod
    def load_copies(self, paths: Sequence[Path]) -> Any:
        """Read copies saved by `save_copy`, in order, as one handle."""

    def recover_copy(self, record, path: Path) -> bool:
        """Write copy ``record.k``'s lost file at ``path`` again if the kind can (True if so).

        A kind that cannot retrain a copy may still find it again (an API copy from its
        recorded job); the default finds nothing.
        """
        return False

    def take_usage(self, k: int) -> dict | None:
        """What copy ``k`` cost since the last call (requests, tokens), for kinds that pay per use.

        Its record adds it up over attempts and processes.
        """
        return None

    def training_summary(self, trained: Any, g: int) -> dict | None:
        """How copy ``g`` of ``trained`` trained (lr, steps, convergence), for its record.

        Kinds that train in process say; remote kinds (their jobs are their own) say nothing.
        """
        return None

    def check(self, objective: Objective) -> None:
        """Refuse ``objective`` if this kind lacks a capability it needs (`check_objective`)."""
        check_objective(self.kind, self.capabilities, objective)

"""Most-influential-subset removal (DESIGN §2): do the top-scored training examples matter?

Take a group of queries that the base model answers correctly, rank the training examples by
their score summed over the group, remove the top N, retrain from scratch (several seeds), and
count the group's queries that become wrong; compare with removing N examples at random. A
good attribution method flips many queries with few removals; random removal flips few.

The evaluation is split into pure steps so that a pipeline can spread the retraining over tasks:

1. `correct_queries` and `query_groups` choose the groups (e.g. one group per class label of the
   correctly answered queries, so that each removal targets its own group's proponents);
2. `plan_removal` lists every retraining as a `daunce_core.evaluation.lds.RetrainJob` with its label
   (`RemovalLabel`); `RemovalPlan.batches` cuts the jobs into slices that can be trained
   together (one keep size each);
3. `daunce_core.evaluation.lds.retrain_jobs` (``outcome="error"``) retrains any slice of the jobs,
   anywhere:
   a job's outcome does not depend on the other jobs it is trained with;
4. `summarize_removal` turns the ``[J, m_query]`` 0/1 errors into the flipped fractions.

`subset_removal` runs the three steps in memory.

**The metric.** For each seed ``s`` the plan holds one *full* retrain ``F_s`` on all the training
data (shared by every group). For group ``g`` with queries ``Q_g`` (all answered correctly by the
base model), the *eligible* queries of seed ``s`` are ``E_gs = {j ∈ Q_g : F_s answers j
correctly}``. A removal job ``R`` (kind ``top`` or ``random``, removing N examples, seed ``s``,
random trial ``t``) forms one *unit* with flipped fraction::

    flipped(R, g) = |{j ∈ E_gs : R answers j wrongly}| / |E_gs|

(undefined, NaN, when ``E_gs`` is empty; such units are left out of the means). For each N and
kind the result is the mean over the defined units (groups × seeds × trials) and its standard
error ``std(ddof=1) / √units``.

Why condition on the full retrain of the same seed rather than on the base model alone: a query
that the retraining recipe gets wrong with *all* the data, at that seed, cannot be flipped by a
removal; counting it would add the recipe's own error rate to both the top and the random
numbers (it is reported separately, as ``full_error``, the fraction of ``Q_g`` that ``F_s``
answers wrongly). Pairing with the same seed shares the initialisation, so what remains between
``F_s`` and ``R`` is the removal plus visiting-order noise, and that noise floor is what random
removal measures. Queries that become *right* after a removal are not subtracted: the question
is whether removing proponents breaks a query. Units are averaged (not queries pooled) so every
group weighs the same whatever its size; units of one seed share ``F_s``, so the standard error,
which treats units as independent, is approximate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from daunce_core.access.task import Task
from daunce_core.data import ExampleSet, batch_slices, num_examples, take
from daunce_core.errors import DaunceError
from daunce_core.evaluation.lds import RetrainJob, retrain_jobs
from daunce_core.method.config import TrainConfig
from daunce_core.method.draws import Stream, stream_rng

KINDS = ("full", "top", "random")
"""Job kinds: no removal (the per-seed reference), top-N removal, random removal of N."""

_ORDER_BITS = 62


def correct_queries(
    model: nn.Module, task: Task, queries: ExampleSet, *, batch_size: int = 1024
) -> np.ndarray:
    """Whether ``model`` answers each query correctly (`Task.correct_from_outputs`): bool ``[m]``.

    The model is put in ``eval()`` mode and evaluated without gradients, in batches.
    """
    model.eval()
    with torch.no_grad():
        flags = [
            task.correct_from_outputs(task.outputs(model, batch), batch).reshape(-1).cpu()
            for batch in (
                take(queries, rows) for rows in batch_slices(num_examples(queries), batch_size)
            )
        ]
    correct = torch.cat(flags).numpy().astype(bool)
    if correct.shape != (num_examples(queries),):
        raise DaunceError(
            f"correct_from_outputs must return one flag per query; got {correct.shape[0]} flags "
            f"for {num_examples(queries)} queries."
        )
    return correct


def query_groups(
    eligible: np.ndarray,
    labels: np.ndarray | torch.Tensor | None = None,
    *,
    max_per_group: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Groups of eligible queries, one per label value (or one group of all), each capped.

    Args:
        eligible: bool ``[m_query]``, the queries that may enter a group (usually
            `correct_queries` of the base model).
        labels: ``[m_query]`` label column (e.g. ``queries["y"]``): one group per distinct label
            among the eligible queries, in sorted label order; None makes one group of all.
        max_per_group: keep at most this many queries per group, drawn without replacement
            (deterministic from ``seed`` and the group's position); None keeps them all.
        seed: seed of that draw.

    Returns:
        Sorted int64 query indices, one array per group; a group's label is
        ``labels[group[0]]``.
    """
    eligible = np.asarray(eligible)
    if eligible.ndim != 1 or eligible.dtype != bool:
        raise DaunceError(
            f"query_groups: eligible must be a 1-D bool mask over the queries; got dtype "
            f"{eligible.dtype} and shape {eligible.shape}."
        )
    if max_per_group is not None and max_per_group < 1:
        raise DaunceError(f"query_groups: max_per_group must be >= 1 or None; got {max_per_group}.")
    if not eligible.any():
        raise DaunceError(
            "query_groups: no eligible query (none answered correctly?); subset removal needs "
            "correctly answered queries."
        )
    if labels is None:
        labels = np.zeros(len(eligible), dtype=np.int64)
    elif isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != eligible.shape:
        raise DaunceError(
            f"query_groups: labels must be one value per query, shape {eligible.shape}; got "
            f"{labels.shape}."
        )
    groups = []
    for position, value in enumerate(np.unique(labels[eligible])):
        members = np.flatnonzero(eligible & (labels == value))
        if max_per_group is not None and len(members) > max_per_group:
            rng = stream_rng(seed, position, Stream.REMOVAL_GROUP)
            members = np.sort(rng.choice(members, size=max_per_group, replace=False))
        groups.append(members.astype(np.int64))
    return groups


def top_proponents(scores: np.ndarray, group: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` training examples with the highest score summed over ``group``'s queries.

    Ranked best first; ties go to the lower training index (a stable sort), so the choice is
    deterministic.
    """
    summed = np.asarray(scores, dtype=np.float64)[:, np.asarray(group)].sum(axis=1)
    return np.argsort(-summed, kind="stable")[:size]


@dataclass(frozen=True)
class RemovalLabel:
    """What one retraining job of a `RemovalPlan` is.

    Attributes:
        kind: ``"full"`` (all the training data, the reference of its seed), ``"top"`` (the
            group's top-N proponents removed) or ``"random"`` (N examples removed at random).
        group: index into the plan's groups; -1 for the full jobs, which every group shares, and
            for random jobs shared by all groups (``share_random=True``).
        size: N, the number of training examples removed (0 for the full jobs).
        seed: the initialisation seed (``make_model(seed)``), ``0..seeds-1``.
        trial: the random-removal trial, ``0..random_trials-1`` (0 for the other kinds).
    """

    kind: str
    group: int
    size: int
    seed: int
    trial: int


@dataclass
class RemovalPlan:
    """Every retraining of a subset-removal evaluation, with what each one is.

    Jobs are ordered full jobs first (one per seed), then by removal size in the order of
    ``sizes``: for each seed the top jobs of every group, then the random jobs. Jobs that keep
    the same number of examples are therefore contiguous (see `batches`).

    Attributes:
        jobs: the retrainings, for `daunce_core.evaluation.lds.retrain_jobs`.
        labels: ``labels[j]`` describes ``jobs[j]``.
        groups: the query groups (int64 query indices).
        sizes: the removal sizes N.
        seeds: the number of initialisation seeds.
        random_trials: random removals per (group, N, seed).
        share_random: whether random jobs serve every group (``group == -1``).
        n_train: number of training examples.
        m_query: number of queries (the columns of the errors matrix).
        top: ``(group, N) ->`` the group's top-N proponents, ranked best first.
    """

    jobs: list[RetrainJob]
    labels: list[RemovalLabel]
    groups: list[np.ndarray]
    sizes: tuple[int, ...]
    seeds: int
    random_trials: int
    share_random: bool
    n_train: int
    m_query: int
    top: dict[tuple[int, int], np.ndarray]
    _index: dict[RemovalLabel, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {label: j for j, label in enumerate(self.labels)}

    def job_of(self, kind: str, group: int, size: int, seed: int, trial: int = 0) -> int:
        """Index of the job with that label (for the full jobs pass ``group=-1, size=0``)."""
        return self._index[RemovalLabel(kind, group, size, seed, trial)]

    def removed(self, job: int) -> np.ndarray:
        """Training indices that job ``job`` leaves out (the top-N ranked best first)."""
        label = self.labels[job]
        if label.kind == "top":
            return self.top[label.group, label.size]
        return np.flatnonzero(~self.jobs[job].keep)

    def batches(self, group_size: int = 64) -> list[slice]:
        """Contiguous slices of at most ``group_size`` jobs that keep the same number of examples.

        Jobs trained together must keep equally many examples, so pass each slice's jobs to
        `daunce_core.evaluation.lds.retrain_jobs` (with the same or a larger ``group_size``)
        separately,
        possibly in separate tasks, and write its outcomes into the rows of that slice.
        """
        if group_size < 1:
            raise DaunceError(f"group_size must be >= 1; got {group_size}.")
        kept = [int(job.keep.sum()) for job in self.jobs]
        slices, start = [], 0
        for stop in range(1, len(kept) + 1):
            if stop == len(kept) or kept[stop] != kept[start] or stop - start == group_size:
                slices.append(slice(start, stop))
                start = stop
        return slices

    def job_rows(self) -> list[dict]:
        """One row per job (index, label fields, order key, examples kept), for a table."""
        return [
            {
                "job": j,
                "kind": label.kind,
                "group": label.group,
                "size": label.size,
                "seed": label.seed,
                "trial": label.trial,
                "order": int(job.order),
                "kept": int(job.keep.sum()),
            }
            for j, (job, label) in enumerate(zip(self.jobs, self.labels, strict=True))
        ]


def plan_removal(
    scores: np.ndarray,
    groups: Sequence[np.ndarray],
    sizes: Sequence[int],
    seeds: int,
    *,
    random_trials: int = 1,
    seed: int = 0,
    share_random: bool = False,
) -> RemovalPlan:
    """Plan the retrainings of a subset-removal evaluation of ``scores``.

    For each seed ``s < seeds``: one full job (all the training data); for each group ``g`` and
    size N: one job without the group's top-N proponents (`top_proponents`: highest score summed
    over the group's queries) and ``random_trials`` jobs without N examples drawn uniformly at
    random. With ``share_random=True`` the random jobs are drawn once per (N, seed, trial) and
    serve every group (G times fewer random retrainings; the groups' random baselines are then
    correlated). Job ``j`` starts from ``make_model(s)`` and visits its examples in an order keyed
    by ``jobs[j].order``, a 62-bit key derived from ``seed`` and the job's label: distinct per
    job, and unchanged when sizes, seeds, trials or groups are added. The random masks likewise
    depend only on ``(seed, label)``. The plan is a deterministic function of its inputs, and its
    full and random jobs do not depend on ``scores`` at all: plans of several methods over the same
    groups share them (retrain once, summarize each method's plan).

    Args:
        scores: ``[n_train, m_query]`` attribution scores, positive = proponent.
        groups: query index arrays (e.g. `query_groups`), each non-empty, without repeats.
        sizes: distinct removal sizes N, each ``1 <= N < n_train``.
        seeds: number of initialisation seeds (>= 1).
        random_trials: random removals per (group, N, seed) (>= 1).
        seed: seed of the random removals and of the visiting orders (>= 0).
        share_random: draw the random removals once for all groups.

    Raises:
        DaunceError: naming the bad argument.
    """
    scores = _check_scores(scores)
    n, m = scores.shape
    groups = _check_groups(groups, m)
    sizes = _check_sizes(sizes, n)
    for name, value in (("seeds", seeds), ("random_trials", random_trials)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise DaunceError(f"plan_removal: {name} must be an integer >= 1; got {value!r}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DaunceError(f"plan_removal: seed must be an integer >= 0; got {seed!r}.")
    seeds, random_trials, seed = int(seeds), int(random_trials), int(seed)

    top = {
        (g, size): top_proponents(scores, group, size)
        for g, group in enumerate(groups)
        for size in sizes
    }
    labels = [RemovalLabel("full", -1, 0, s, 0) for s in range(seeds)]
    random_groups = [-1] if share_random else list(range(len(groups)))
    for size in sizes:
        for s in range(seeds):
            labels += [RemovalLabel("top", g, size, s, 0) for g in range(len(groups))]
            labels += [
                RemovalLabel("random", g, size, s, t)
                for g in random_groups
                for t in range(random_trials)
            ]
    jobs = [
        RetrainJob(keep=_keep(label, n, top, seed), seed=label.seed, order=_order(label, seed))
        for label in labels
    ]
    if len({job.order for job in jobs}) != len(jobs):  # pragma: no cover - a 2^-62 event
        raise DaunceError("plan_removal: two jobs drew the same order key; change seed.")
    return RemovalPlan(
        jobs=jobs,
        labels=labels,
        groups=groups,
        sizes=sizes,
        seeds=seeds,
        random_trials=random_trials,
        share_random=bool(share_random),
        n_train=n,
        m_query=m,
        top=top,
    )


def retrain_removal(
    make_model: Callable[[int], nn.Module],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    plan: RemovalPlan,
    config: TrainConfig,
    *,
    l2: float = 0.0,
    group_size: int = 64,
) -> np.ndarray:
    """Retrain every job of ``plan`` (`RemovalPlan.batches`); 0/1 errors ``[J, m_query]``.

    What a pipeline does with one task per batch, here in one process.
    """
    if num_examples(train) != plan.n_train or num_examples(queries) != plan.m_query:
        raise DaunceError(
            f"the plan is for {plan.n_train} training examples and {plan.m_query} queries; got "
            f"{num_examples(train)} and {num_examples(queries)}."
        )
    errors = np.empty((len(plan.jobs), plan.m_query))
    for part in plan.batches(group_size):
        errors[part] = retrain_jobs(
            make_model,
            task,
            train,
            queries,
            plan.jobs[part],
            config,
            l2=l2,
            outcome="error",
            group_size=group_size,
        )
    return errors


@dataclass
class RemovalResult:
    """Flipped fractions of a subset-removal evaluation (see the module docstring).

    Attributes:
        sizes: the removal sizes N, ``[K]``.
        top: mean flipped fraction after removing each group's top-N proponents, ``[K]``.
        top_stderr: its standard error (NaN with fewer than two defined units).
        random: the same after removing N examples at random, ``[K]``.
        random_stderr: its standard error.
        full_error: mean over groups × seeds of the fraction of the group's queries that the
            full-data retrain answers wrongly (the recipe's own error on base-correct queries).
        rows: one dict per unit (kind, group, size, seed, trial, job, queries, eligible,
            flipped, fraction), full units included (size 0, eligible = the group's queries,
            flipped = answered wrongly by the full retrain): a tidy table.
    """

    sizes: np.ndarray
    top: np.ndarray
    top_stderr: np.ndarray
    random: np.ndarray
    random_stderr: np.ndarray
    full_error: float
    rows: list[dict]

    def summary(self) -> list[dict]:
        """One row per (kind, size): mean, standard error and number of defined units."""
        out = []
        for kind, size in [("full", 0)] + [(k, int(n)) for n in self.sizes for k in KINDS[1:]]:
            values = _fractions(self.rows, kind, size)
            mean, stderr = _mean_stderr(values)
            out.append(
                {"kind": kind, "size": size, "mean": mean, "stderr": stderr, "units": len(values)}
            )
        return out


def summarize_removal(plan: RemovalPlan, errors: np.ndarray) -> RemovalResult:
    """Flipped fractions per removal size from the jobs' 0/1 errors.

    Args:
        plan: the plan the jobs came from.
        errors: ``[J, m_query]`` 0/1 outcomes, ``errors[j, q] = 1`` if job ``j`` answers query
            ``q`` wrongly (`daunce_core.evaluation.lds.retrain_jobs` with ``outcome="error"``).
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.shape != (len(plan.jobs), plan.m_query):
        raise DaunceError(
            f"summarize_removal: errors must be [jobs, queries] = "
            f"[{len(plan.jobs)}, {plan.m_query}]; got shape {errors.shape}."
        )
    if not np.isin(errors, (0.0, 1.0)).all():
        raise DaunceError(
            "summarize_removal: errors must hold 0/1 outcomes (retrain_jobs with "
            "outcome='error'); found other values (NaN, losses?)."
        )
    wrong = errors.astype(bool)
    rows = []
    for s in range(plan.seeds):
        full = plan.job_of("full", -1, 0, s)
        for g, group in enumerate(plan.groups):
            rows.append(_row("full", g, 0, s, 0, full, group, group, wrong[full, group]))
    for size in plan.sizes:
        for s in range(plan.seeds):
            right = ~wrong[plan.job_of("full", -1, 0, s)]
            for g, group in enumerate(plan.groups):
                eligible = group[right[group]]
                job = plan.job_of("top", g, size, s)
                rows.append(_row("top", g, size, s, 0, job, group, eligible, wrong[job, eligible]))
                for t in range(plan.random_trials):
                    job = plan.job_of("random", -1 if plan.share_random else g, size, s, t)
                    flips = wrong[job, eligible]
                    rows.append(_row("random", g, size, s, t, job, group, eligible, flips))
    stats = {
        kind: np.array([_mean_stderr(_fractions(rows, kind, size)) for size in plan.sizes])
        for kind in KINDS[1:]
    }
    return RemovalResult(
        sizes=np.array(plan.sizes, dtype=np.int64),
        top=stats["top"][:, 0],
        top_stderr=stats["top"][:, 1],
        random=stats["random"][:, 0],
        random_stderr=stats["random"][:, 1],
        full_error=_mean_stderr(_fractions(rows, "full", 0))[0],
        rows=rows,
    )


def subset_removal(
    make_model: Callable[[int], nn.Module],
    task: Task,
    train: ExampleSet,
    queries: ExampleSet,
    scores: np.ndarray,
    config: TrainConfig,
    *,
    groups: Sequence[np.ndarray],
    sizes: Sequence[int],
    seeds: int = 3,
    random_trials: int = 1,
    seed: int = 0,
    share_random: bool = False,
    l2: float = 0.0,
    group_size: int = 64,
) -> RemovalResult:
    """The subset-removal evaluation in memory: `plan_removal`, `retrain_removal`, summarize.

    Build ``groups`` from the base model, e.g.
    ``query_groups(correct_queries(model, task, queries), queries["y"], max_per_group=50)``.
    ``make_model(s)`` returns a fresh, untrained model for seed ``s``; every job is trained
    from scratch with ``config`` and the L2 penalty ``l2`` (the base model's recipe). See
    `plan_removal` for the other arguments and the module docstring for the metric.
    """
    plan = plan_removal(
        scores,
        groups,
        sizes,
        seeds,
        random_trials=random_trials,
        seed=seed,
        share_random=share_random,
    )
    errors = retrain_removal(
        make_model, task, train, queries, plan, config, l2=l2, group_size=group_size
    )
    return summarize_removal(plan, errors)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] < 2 or scores.shape[1] < 1:
        raise DaunceError(
            f"plan_removal: scores must be [n_train, m_query] with n_train >= 2 and m_query >= 1; "
            f"got shape {scores.shape}."
        )
    bad = ~np.isfinite(scores)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DaunceError(
            f"plan_removal: scores hold {int(bad.sum())} NaN or infinite values (training rows "
            f"{rows[:10].tolist()}); fix or drop them before ranking."
        )
    return scores


def _check_groups(groups: Sequence[np.ndarray], m: int) -> list[np.ndarray]:
    if len(groups) == 0:
        raise DaunceError("plan_removal: groups is empty; pass at least one group of queries.")
    checked = []
    for g, group in enumerate(groups):
        group = np.asarray(group)
        if group.ndim != 1 or len(group) == 0:
            raise DaunceError(
                f"plan_removal: groups[{g}] must be a non-empty 1-D array of query indices; got "
                f"shape {group.shape}."
            )
        if not np.issubdtype(group.dtype, np.integer):
            raise DaunceError(
                f"plan_removal: groups[{g}] must hold integer query indices; got dtype "
                f"{group.dtype} (a bool mask? use np.flatnonzero)."
            )
        if group.min() < 0 or group.max() >= m:
            raise DaunceError(
                f"plan_removal: groups[{g}] holds query indices outside 0..{m - 1} (scores has "
                f"{m} query columns)."
            )
        if len(np.unique(group)) != len(group):
            raise DaunceError(f"plan_removal: groups[{g}] repeats a query index.")
        checked.append(group.astype(np.int64))
    return checked


def _check_sizes(sizes: Sequence[int], n: int) -> tuple[int, ...]:
    sizes = list(sizes)
    if not sizes:
        raise DaunceError("plan_removal: sizes is empty; pass at least one removal size N.")
    for size in sizes:
        if not isinstance(size, (int, np.integer)) or not 1 <= size < n:
            raise DaunceError(
                f"plan_removal: sizes must be integers N with 1 <= N < n_train = {n} (a retrain "
                f"needs at least one example); got {size!r}."
            )
    if len(set(sizes)) != len(sizes):
        raise DaunceError(f"plan_removal: sizes must be distinct; got {sizes}.")
    return tuple(int(size) for size in sizes)


def _keep(label: RemovalLabel, n: int, top: dict, seed: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    if label.kind == "top":
        keep[top[label.group, label.size]] = False
    elif label.kind == "random":
        key = (label.size, label.seed, label.trial, label.group + 1)
        keep[
            stream_rng(seed, 0, Stream.REMOVAL_RANDOM, *key).choice(
                n, size=label.size, replace=False
            )
        ] = False
    return keep


def _order(label: RemovalLabel, seed: int) -> int:
    key = (KINDS.index(label.kind), label.group + 1, label.size, label.seed, label.trial)
    sequence = np.random.SeedSequence([seed, int(Stream.REMOVAL_ORDER), *key])
    words = sequence.generate_state(2, np.uint64)
    return int(words[0]) >> (64 - _ORDER_BITS)


def _row(kind, g, size, s, t, job, group, eligible, flips) -> dict:
    count = len(eligible)
    flipped = int(np.count_nonzero(flips))
    return {
        "kind": kind,
        "group": g,
        "size": size,
        "seed": s,
        "trial": t,
        "job": int(job),
        "queries": len(group),
        "eligible": count,
        "flipped": flipped,
        "fraction": flipped / count if count else float("nan"),
    }


def _fractions(rows: list[dict], kind: str, size: int) -> np.ndarray:
    values = np.array([r["fraction"] for r in rows if r["kind"] == kind and r["size"] == size])
    return values[np.isfinite(values)]


def _mean_stderr(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    stderr = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), stderr

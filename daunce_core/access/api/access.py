"""The ``api`` model access: copies are fine-tuning jobs of an OpenAI-compatible server.

The paper's "API-based black-box access" (§5): the weights stay on the server; DAUNCE uploads
training files, starts fine-tuning jobs and reads log-probabilities. A fine-tuning endpoint
minimises plain NLL, so two perturbations are expressible (DESIGN §1):

* the paper's Table 2 form (``objective: {access: black_box}``, ``subset_ratio`` < 1): copy k
  fine-tunes θ0 on its random subset ``D^k`` with the observed completions;
* sampled labels (``objective: {access: black_box, labels: sampled}``): copy k fine-tunes on its
  subset with a completion *sampled from θ0* (temperature 1) for each prompt — a parametric
  bootstrap whose gradient at θ0 has mean zero and Gauss-Newton covariance.

Per copy (`APIAccess.train`): write the training file (chat-format JSONL: the prompt as the user
message, the completion as the assistant's), upload it, create the job (suffix
``<run>-k<k>-a<attempt>``, the run's seed), record the job id through the
journal *before* waiting, poll, keep the fine-tuned model id. A failed job is retried as a new
job up to ``limits.job_attempts``, every attempt recorded; a rerun polls the jobs it recorded
(and adopts a job of the same suffix created just before a kill) instead of creating new ones.
Losses (`APIAccess.evaluate`): the mean NLL of each completion's tokens under each copy
(`APIClient.echo_losses`), or a one-token answer's NLL (`APIClient.answer_losses`).

A copy is saved as a small JSON file (the fine-tuned model's id, its job, the server); it cannot
be reproduced from its seed (`Capabilities.deterministic` is False), so a lost file is named,
never silently replaced by a new paid job.
"""

from __future__ import annotations

import json
import threading
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from daunce_core.access.api.client import APIClient, Usage
from daunce_core.access.api.probes import (
    ProbeSet,
    check_probes,
    probe_factors,
    probe_rows,
    stand_in,
)
from daunce_core.access.base import (
    Capabilities,
    CopiesFailed,
    CopyJournal,
    CopyLosses,
    ModelAccess,
)
from daunce_core.errors import DaunceError
from daunce_core.method.config import DaunceConfig
from daunce_core.method.draws import Stream, draw_perturbation, epoch_order, stream_rng
from daunce_core.method.subspace import Reflections

FIND_JOB_PAGES = 20
"""Pages of 100 jobs searched for a job of a copy's suffix (the newest 2,000 jobs)."""

UNREADABLE = "\ufffd"
"""What a server answers for bytes that do not decode (a sample cut inside a character)."""

REFUSED_FILE_CODES = ("invalid_training_file", "invalid_file", "invalid_n_examples")
"""Job error codes that a new job on the same data would meet again: not retried."""


@dataclass(frozen=True)
class TextExamples:
    """Prompts and completions as the server sees them (the completion follows the prompt)."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_columns(cls, task: dict, columns: dict, where: str) -> TextExamples:
        """The examples of a ``causal_lm`` task's columns: ``separator + completion`` follows."""
        if task.get("chat"):
            raise DaunceError(
                "task.chat is not available with model.access: api: the prompt is sent as one "
                "user message and the server applies its own format; set task.chat: false."
            )
        separator = task.get("separator", " ")
        raw_prompts = list(columns[task.get("prompt", "prompt")])
        raw_completions = list(columns[task.get("completion", "completion")])
        missing = [
            i
            for i, (p, c) in enumerate(zip(raw_prompts, raw_completions, strict=True))
            if not isinstance(p, str) or not isinstance(c, str)
        ]
        if missing:
            raise DaunceError(
                f"{where}: examples {missing[:5]} have a missing (null) or non-text prompt or "
                "completion; every example needs both as text."
            )
        prompts = list(raw_prompts)
        completions = [separator + c for c in raw_completions]
        empty = [i for i, c in enumerate(completions) if not c.strip()]
        if empty:
            raise DaunceError(
                f"{where}: the completions of examples {empty[:5]} are empty; every example needs "
                "a completion to measure its loss."
            )
        return cls(prompts, completions)


@dataclass
class APICopies:
    """Trained API copies: fine-tuned model ids, in the order of ``ks``."""

    ks: list[int]
    models: list[str]
    jobs: list[str | None]


class ServerAccess(ModelAccess):
    """What the kinds that reach θ0 on a server share (``api``, ``prompt``).

    The text of both splits, the client, θ0's id and how losses are read; per-copy usage;
    copies trained concurrently (`_each`); and each copy measured by reading the losses of
    every example, under the copy's model and before each prompt the copy's prefix
    (`readers`).

    Args:
        client: the server, with the key and limits.
        base_model: θ0's id on the server.
        loss_method: ``echo`` or ``top_logprobs`` (resolved, not ``auto``).
        train_set: the training examples (text).
        query_set: the queries (text).
        config: the run's DAUNCE settings (K, subset ratio, objective, seed).
    """

    def __init__(
        self,
        client: APIClient,
        base_model: str,
        loss_method: str,
        train_set: TextExamples,
        query_set: TextExamples,
        config: DaunceConfig,
    ) -> None:
        if loss_method not in ("echo", "top_logprobs"):
            raise DaunceError(f"loss_method must be 'echo' or 'top_logprobs'; got {loss_method!r}.")
        self.check(config.objective)
        self.client, self.base_model, self.loss_method = client, base_model, loss_method
        self.train_set, self.query_set, self.config = train_set, query_set, config
        self._usage: dict[int, Usage] = {}
        self._lock = threading.Lock()

    @property
    def num_train(self) -> int:
        """n, the number of training examples."""
        return len(self.train_set)

    @property
    def num_queries(self) -> int:
        """m, the number of queries."""
        return len(self.query_set)

    def usage_of(self, k: int) -> Usage:
        """What copy ``k`` has cost in this process (requests, retries, tokens, jobs)."""
        with self._lock:
            return self._usage.setdefault(k, Usage())

    def take_usage(self, k: int) -> dict | None:
        """Copy ``k``'s usage counts since the last call, for its record."""
        with self._lock:
            usage = self._usage.get(k)
        return self.client.drain(usage) if usage is not None else None

    def _each(self, ks: list[int], work) -> tuple[dict, dict]:
        """``work(k)`` for every copy at once (threads); ``(results, errors)`` by copy.

        Every copy is waited for, so one copy's failure loses none of the others.
        """
        done: dict[int, Any] = {}
        failed: dict[int, Exception] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(ks))) as pool:
            futures = {k: pool.submit(work, k) for k in ks}
            for k, future in futures.items():
                try:
                    done[k] = future.result()
                except Exception as error:  # every copy is waited for before raising
                    failed[k] = error
        return done, failed

    @abstractmethod
    def readers(self, trained) -> list[tuple[str, str]]:
        """Per copy of ``trained``: the model to read losses from and the prefix of prompts."""

    def losses(
        self, model: str, examples: TextExamples, usage: Usage | None = None, prefix: str = ""
    ) -> np.ndarray:
        """The loss of every example under ``model``, ``prefix`` before each prompt, ``[n]``."""
        if prefix:
            examples = TextExamples([prefix + p for p in examples.prompts], examples.completions)
        return example_losses(self.client, self.loss_method, model, examples, usage)

    def evaluate(self, ks: Sequence[int], trained) -> CopyLosses:
        """Loss rows of copies ``ks``: every training example and query under each copy."""
        rows = {}
        for split, examples in (("train", self.train_set), ("query", self.query_set)):
            rows[split] = np.stack(
                [
                    self.losses(model, examples, self.usage_of(k), prefix)
                    for k, (model, prefix) in zip(ks, self.readers(trained), strict=True)
                ]
            )
        train, query = rows["train"], rows["query"]
        diverged = ~(np.isfinite(train).all(axis=1) & np.isfinite(query).all(axis=1))
        return CopyLosses(np.asarray(ks), train, query, diverged)

    def measure_queries(self, trained, start: int) -> np.ndarray:
        """Query losses from ``start`` on, under each copy, ``[G, m − start]``."""
        tail = TextExamples(self.query_set.prompts[start:], self.query_set.completions[start:])
        return np.stack(
            [
                self.losses(model, tail, self.usage_of(k), prefix)
                for k, (model, prefix) in zip(trained.ks, self.readers(trained), strict=True)
            ]
        )


class APIAccess(ServerAccess):
    """Perturbed copies as fine-tuning jobs of an OpenAI-compatible server.

    Args:
        client: the server, with the key and limits.
        base_model: θ0's id on the server.
        loss_method: ``echo`` or ``top_logprobs`` (resolved, not ``auto``).
        train_set: the training examples (text).
        query_set: the queries (text).
        config: the run's DAUNCE settings (K, subset ratio, objective, seed).
        label: names the run in job suffixes and file names (e.g. the run id).
    """

    kind: ClassVar[str] = "api"
    capabilities: ClassVar[Capabilities] = Capabilities(
        gradients=False,
        fine_tuning=True,
        custom_objective=False,
        deterministic=False,
        bootstrap=True,
    )
    copy_suffix: ClassVar[str] = ".model.json"

    def __init__(
        self,
        client: APIClient,
        base_model: str,
        loss_method: str,
        train_set: TextExamples,
        query_set: TextExamples,
        config: DaunceConfig,
        label: str,
    ) -> None:
        super().__init__(client, base_model, loss_method, train_set, query_set, config)
        self.label = label
        self._counted: set[str] = set()
        self._probes: ProbeSet | None = None

    def _note_usage(self, k: int, journal: CopyJournal) -> None:
        """Write what copy ``k`` has cost so far into its record (a kill loses none of it)."""
        counts = self.take_usage(k)
        if counts and any(counts.values()):
            journal.record_usage(k, counts)

    def recover_copy(self, record, path: Path) -> bool:
        """Write a lost copy file again from its recorded job (its fine-tuned model's id)."""
        if not record.job_id:
            return False
        job = self.client.job(record.job_id)
        if job.status != "succeeded" or not job.fine_tuned_model:
            return False
        self.save_copy(APICopies([record.k], [job.fine_tuned_model], [job.id]), 0, path)
        return True

    # Training ------------------------------------------------------------------------

    def train(self, ks: Sequence[int], journal: CopyJournal | None = None) -> APICopies:
        """Fine-tune copies ``ks`` as jobs (module docstring), at most ``jobs_in_flight`` at once.

        Raises:
            CopiesFailed: some copies did not succeed (each named with its jobs' errors); it
                carries the copies that did, so that they are measured and kept.
        """
        if journal is None:
            raise DaunceError("API copies need a journal to record their jobs before waiting.")
        done, failed = self._each([int(k) for k in ks], lambda k: self._copy(k, journal))
        trained = APICopies(
            list(done), [m for m, _ in done.values()], [j for _, j in done.values()]
        )
        if failed:
            raise CopiesFailed(trained.ks, trained, failed)
        return trained

    def _copy(self, k: int, journal: CopyJournal) -> tuple[str, str]:
        """Bring copy ``k``'s job to success; its fine-tuned model id and job id.

        One job slot (``limits.jobs_in_flight``) is held from the upload to the job's end.
        """
        usage = self.usage_of(k)
        errors: list[str] = []
        with self.client.job_slot():
            job_id, fresh = journal.job_id(k), False
            while True:
                if job_id is not None:
                    job = self._wait(k, job_id, journal, usage)
                    if job.status == "succeeded":
                        found = self._succeeded(k, job, usage)
                        self._note_usage(k, journal)
                        return found
                    self._note_usage(k, journal)
                    errors.append(self._failed(k, job, fresh))
                attempts = journal.jobs(k)
                if len(attempts) >= self.client.limits.job_attempts:
                    raise DaunceError(
                        f"copy {k}: {len(attempts)} fine-tuning job(s) did not succeed "
                        f"({'; '.join(errors) or ', '.join(attempts)}). Fix the cause the "
                        "server names, then rerun (finished copies are kept); to try more "
                        "jobs raise model.recipe.limits.job_attempts."
                    )
                job_id, fresh = self._submit(k, len(attempts), journal, usage), True

    def _succeeded(self, k: int, job, usage: Usage) -> tuple[str, str]:
        if not job.fine_tuned_model:
            raise DaunceError(f"copy {k}: job {job.id} succeeded without a fine-tuned model id.")
        with self._lock:  # a job's tokens count once, however often it is polled
            new = job.id not in self._counted
            self._counted.add(job.id)
        if new:
            self.client.count(usage, trained_tokens=job.trained_tokens or 0)
        return job.fine_tuned_model, job.id

    def _failed(self, k: int, job, fresh: bool) -> str:
        """What a job that ended without success says; raise if a new job would fail the same.

        A training file refused by a job of this run stops the copy at once (the same file
        would be refused again); one refused in an earlier run (the data may have been fixed
        since) counts as a failed attempt.
        """
        detail = _job_error(job)
        code = getattr(getattr(job, "error", None), "code", None)
        if fresh and code in REFUSED_FILE_CODES:
            raise DaunceError(
                f"copy {k}: the server refused its training file ({detail}); no other job "
                "was tried. Fix the data (or model.recipe.sample_max_tokens for sampled "
                "completions), then rerun: finished copies are kept."
            )
        return f"{job.id} {job.status}" + (f" ({detail})" if detail else "")

    def _submit(self, k: int, attempt: int, journal: CopyJournal, usage: Usage) -> str:
        """Create attempt ``attempt`` of copy ``k``'s job, or adopt it if it already exists.

        A job of the attempt's suffix created before a kill (or whose creation's answer was
        lost, `APIClient.create_job`) is adopted: a paid job is never created twice.
        """
        suffix = self.suffix(k, attempt)
        found = self._find_job(suffix, usage)
        if found is not None:
            self.client.count(usage, adopted=1)
        else:
            lines = self.training_lines(k, attempt, usage)
            file_id = self.client.upload(f"{suffix}.jsonl", lines, usage)
            found = self.client.create_job(
                self.base_model,
                file_id,
                suffix,
                self.job_seed(k, attempt),
                find=lambda: self._find_job(suffix, usage),
                usage=usage,
            )
        # The job and what it cost (its upload, its creation) in one write: a kill keeps both
        # or neither (then a rerun adopts the job by its suffix, uncounted).
        journal.record_job(k, found, self.take_usage(k))
        return found

    def suffix(self, k: int, attempt: int) -> str:
        """The job suffix of copy ``k``'s attempt ``attempt``: ``<label>-k<k>-a<attempt>``."""
        return f"{self.label}-k{k}-a{attempt}"

    def _find_job(self, suffix: str, usage: Usage) -> str | None:
        """A job of ``suffix`` that exists without a record of it (a kill, a lost answer).

        Asked by metadata (servers that filter on it answer at once) and checked by suffix
        on every page, newest first, up to `FIND_JOB_PAGES` pages of 100 jobs.
        """
        page = self.client.call(
            "list fine-tuning jobs",
            self.client.openai.fine_tuning.jobs.list,
            limit=100,
            metadata={"daunce_copy": suffix},
            usage=usage,
        )
        for _ in range(FIND_JOB_PAGES):
            for job in page.data:
                if _suffix_of(job) == suffix:
                    return job.id
            if not page.has_next_page():
                return None
            page = self.client.call("list fine-tuning jobs", page.get_next_page, usage=usage)
        return None

    def _wait(self, k: int, job_id: str, journal: CopyJournal, usage: Usage):
        import openai

        def on_state(job) -> None:
            journal.record_job_state(k, job.status, _job_error(job) or None)

        try:
            return self.client.wait(job_id, on_state=on_state, usage=usage)
        except DaunceError as error:
            if isinstance(error.__cause__, openai.NotFoundError):
                raise DaunceError(
                    f"copy {k}: the server no longer knows its job {job_id} (404). If the job "
                    f"is gone for good, delete copies/copy-{k:06d}.json in the run folder to "
                    "pay for a new job for this copy, then rerun."
                ) from error
            raise

    def job_seed(self, k: int, attempt: int) -> int:
        """The seed sent with every job: the run's seed.

        As the in-process LoRA copies share one initialisation (A from the run's seed, B = 0),
        the copies differ by their subsets (and sampled completions) alone; with the local
        server, a copy trained through the API is then the in-process copy of the same
        objective (`tests/test_api_pipeline.py` checks it).
        """
        return int(self.config.seed)

    def sample_seed(self, k: int, attempt: int) -> int:
        """The seed of copy ``k``'s sampled completions (attempt ``attempt``): ``(seed, k)``."""
        rng = stream_rng(self.config.seed, k, Stream.API_SAMPLES, attempt)
        return int(rng.integers(0, 2**31 - 1))

    def training_lines(self, k: int, attempt: int, usage: Usage | None = None) -> list[dict]:
        """Copy ``k``'s training file: its subset, in its visiting order, as chat messages.

        With sampled labels each completion is drawn from θ0 (temperature 1, seeded by the
        copy and attempt) instead of the observed one.
        """
        c = self.config
        draw = draw_perturbation(
            self.num_train, k, seed=c.seed, subset_ratio=c.subset_ratio, antithetic=c.antithetic
        )
        order = epoch_order(draw, 0, c.seed)
        prompts = [self.train_set.prompts[i] for i in order]
        if c.objective.labels == "sampled":
            completions = self.client.sample(
                self.base_model, prompts, self.sample_seed(k, attempt), usage
            )
        else:
            completions = [self.train_set.completions[i] for i in order]
        return [
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion},
                ]
            }
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    # Losses ----------------------------------------------------------------------------

    def readers(self, trained: APICopies) -> list[tuple[str, str]]:
        """Each copy's fine-tuned model, with no prefix."""
        return [(model, "") for model in trained.models]

    def base_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """θ0's losses on the training set and the queries."""
        return self.losses(self.base_model, self.train_set), self.losses(
            self.base_model, self.query_set
        )

    # One-sided subspace scores (`daunce_core.access.api.probes`) ----------------------------

    prox: ClassVar[float] = 0.0
    """No parameter part in ``Q``: the copies' parameters are the server's."""

    def prepare_reflections(self, path: Path, queries_key: str) -> ProbeSet:
        """The run's curvature probes and θ0's losses: read from ``path``, else made and kept.

        Made once per run, before any copy is measured on them: `PROBES` training prompts with
        a completion sampled from θ0 (temperature 1, seeded; one token where losses are read
        from ``top_logprobs``), θ0's losses on them, on the training set and on the queries.
        Queries that changed since (``queries_key``) are measured under θ0 again; the probes
        stay.
        """
        probes = ProbeSet.read(path, self.num_train)
        if probes is None:
            rows = probe_rows(self.num_train, self.config.seed)
            prompts = [self.train_set.prompts[i] for i in rows]
            one_token = self.loss_method != "echo"
            seed = int(stream_rng(self.config.seed, 0, Stream.CURVATURE_PROBES).integers(2**31))
            completions = self.client.sample(
                self.base_model, prompts, seed, max_tokens=1 if one_token else None
            )
            # A sample cut inside a character comes back with U+FFFD, a text θ0 never sampled:
            # keep what precedes it (a prefix of a sample is a sample of that prefix's length).
            completions = [text.split(UNREADABLE, 1)[0] for text in completions]
            used = [i for i, text in enumerate(completions) if text]
            tokens, probe = np.zeros(len(rows), dtype=np.int64), np.full(len(rows), np.nan)
            if used:
                chosen = TextExamples([prompts[i] for i in used], [completions[i] for i in used])
                losses, counts = example_losses(
                    self.client, self.loss_method, self.base_model, chosen, with_tokens=True
                )
                probe[used], tokens[used] = losses, counts
            probes = ProbeSet(
                rows=rows.tolist(),
                completions=completions,
                tokens=tokens.tolist(),
                probe=probe.tolist(),
                train=self.losses(self.base_model, self.train_set).tolist(),
                query=[],
                queries_key="",
            )
            check_probes(probes)
            probes.write(path)
        if probes.queries_key != queries_key or len(probes.query) != self.num_queries:
            probes.query = self.losses(self.base_model, self.query_set).tolist()
            probes.queries_key = queries_key
            probes.write(path)
        self._probes = probes
        return probes

    def changes_shape(self) -> tuple[int, ...]:
        """One copy's curvature factors: a value per probe, ``(n_c,)``."""
        return (len(probe_rows(self.num_train, self.config.seed)),)

    def measure_reflections(self, trained: APICopies, losses: CopyLosses) -> Reflections:
        """The one-sided stand-ins of ``trained``'s reflections and their factors on the probes.

        ``losses``: the copies' own loss rows (as stored). Needs `prepare_reflections` first.
        """
        probes = self._probes
        if probes is None:
            raise DaunceError("prepare_reflections must run before the copies are measured.")
        used = np.flatnonzero(probes.used)
        examples = TextExamples(
            [self.train_set.prompts[probes.rows[i]] for i in used],
            [probes.completions[i] for i in used],
        )
        on_probes = np.zeros((len(trained.models), len(probes.rows)))
        for g, (model, prefix) in enumerate(self.readers(trained)):
            usage = self.usage_of(trained.ks[g])
            on_probes[g, used] = self.losses(model, examples, usage, prefix)
        factors = probe_factors(on_probes, probes)
        return Reflections(
            train=stand_in(losses.train, probes.train),
            query=stand_in(losses.query, probes.query[: losses.query.shape[1]]),
            changes=factors,
            curved=factors,
        )

    # Saved copies ------------------------------------------------------------------------

    def save_copy(self, trained: APICopies, g: int, path: Path) -> None:
        """Write copy ``g``'s fine-tuned model id, job and server to ``path`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(
            json.dumps(
                {
                    "k": trained.ks[g],
                    "model": trained.models[g],
                    "job_id": trained.jobs[g],
                    "base_model": self.base_model,
                    "base_url": self.client.recipe.base_url,
                },
                indent=1,
            )
        )
        partial.replace(path)

    def load_copies(self, paths: Sequence[Path]) -> APICopies:
        """The copies saved by `save_copy`, in order."""
        ks, models, jobs = [], [], []
        for path in paths:
            try:
                saved = json.loads(Path(path).read_text())
                ks.append(int(saved["k"]))
                models.append(str(saved["model"]))
                jobs.append(saved.get("job_id"))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise DaunceError(
                    f"the saved API copy {path} is unreadable ({error}); restore it, or delete "
                    "the copy's record to fine-tune a new copy in its place."
                ) from error
        return APICopies(ks, models, jobs)


def example_losses(
    client: APIClient,
    method: str,
    model: str,
    examples: TextExamples,
    usage: Usage | None = None,
    *,
    with_tokens: bool = False,
):
    """The loss of every example under ``model`` by ``method`` (``echo``/``top_logprobs``).

    With ``with_tokens``: ``(losses, completion tokens)`` (one token per ``top_logprobs``
    answer).
    """
    if len(examples) == 0:
        return (np.zeros(0), np.zeros(0, dtype=np.int64)) if with_tokens else np.zeros(0)
    if method != "echo" and client.recipe.end_text:
        raise DaunceError(
            "model.recipe.end_text needs losses read by echo, and this server answers "
            "top_logprobs only; remove end_text."
        )
    if method == "echo":
        end = client.recipe.end_text or ""
        completions = [completion + end for completion in examples.completions]
        losses, tokens = client.echo_losses(model, examples.prompts, completions, usage)
    else:
        losses = client.answer_losses(model, examples.prompts, examples.completions, usage)[0]
        tokens = np.ones(len(losses), dtype=np.int64)
    return (losses, tokens) if with_tokens else losses


def _suffix_of(job) -> str | None:
    """The suffix a job was created with: its metadata, or the server's suffix field."""
    metadata = getattr(job, "metadata", None) or {}
    if isinstance(metadata, dict) and metadata.get("daunce_copy"):
        return metadata["daunce_copy"]
    named = getattr(job, "suffix", None) or getattr(job, "user_provided_suffix", None)
    if named is None and job.model_extra:
        named = job.model_extra.get("suffix")
    return named


def _job_error(job) -> str:
    error = getattr(job, "error", None)
    if error is None:
        return ""
    code, message = getattr(error, "code", None), getattr(error, "message", None)
    return ": ".join(str(part) for part in (code, message) if part)

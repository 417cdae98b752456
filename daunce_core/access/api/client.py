"""A patient client of an OpenAI-compatible API: retries, rate and job limits, usage counts.

Everything goes through the official ``openai`` client with its own retries switched off, so
that one place (`APIClient.call`) decides what is retried and how long to wait:

* 429, 5xx, timeouts and dropped connections are sent again, up to ``limits.retries`` times,
  after ``backoff · 2^attempt`` seconds with full jitter (capped), or the server's
  ``Retry-After`` when it gives one;
* 401/403 (the key), 404 (a model or job the server does not have) and 400 (a request the
  server refuses) are raised at once as `DaunceError` naming the fix;
* requests are spaced to at most ``limits.requests_per_second`` per process and server, and
  fine-tuning jobs in flight are bounded by ``limits.jobs_in_flight`` (`job_slot`).

Requests exhausted on a transient failure raise `APIUnavailable`, which is also a
`ConnectionError`: the pipeline's task retries treat it as transient, while every job already
created stays recorded. `Usage` counts requests, retries and tokens, so a run reports its cost.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from daunce_core.access.api.config import APIRecipe, Limits
from daunce_core.errors import DaunceError


class APIUnavailable(DaunceError, ConnectionError):
    """The server kept failing transiently (429, 5xx, timeouts) beyond the retries allowed."""


@dataclass
class Usage:
    """What a run (or one copy) cost: requests, retries, tokens, jobs created and adopted.

    ``adopted`` counts jobs found on the server under a copy's suffix without a record of
    them (created just before a kill, or by another workspace with the same run).
    """

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0
    jobs: int = 0
    adopted: int = 0

    def add(self, other: Usage) -> None:
        """Add ``other``'s counts to these."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return asdict(self)


class _Pacer:
    """At most ``rate`` requests per second, shared by every thread of the process."""

    def __init__(self, rate: float) -> None:
        self.interval, self.next, self.lock = 1.0 / rate, 0.0, threading.Lock()

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (a 429 asked every thread to slow down)."""
        with self.lock:
            self.next = max(self.next, time.monotonic() + seconds)

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        if start > now:
            time.sleep(start - now)


_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(kind: str, base_url: str, value: float, make: Callable[[], Any]) -> Any:
    """One pacer or job semaphore per server and setting, for the whole process."""
    key = (kind, base_url.rstrip("/"), value)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


MAX_RETRY_AFTER = 600.0
"""The longest wait a server's ``Retry-After`` is honoured for, in seconds."""


PENDING = ("validating_files", "queued", "running", "paused", "created", "pending")
"""Job states that may still end in success (polled on)."""


def retry_after(error: Exception | None) -> float | None:
    """The wait a failed response asks for, at most `MAX_RETRY_AFTER` seconds, or None.

    From ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date.
    """
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    seconds = None
    if headers.get("retry-after-ms") is not None:
        try:
            seconds = float(headers["retry-after-ms"]) / 1000
        except ValueError:
            seconds = None
    value = headers.get("retry-after")
    if seconds is None and value is not None:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = (when - datetime.now(timezone.utc)).total_seconds()
            except (TypeError, ValueError):
                seconds = None
    return None if seconds is None else min(max(0.0, seconds), MAX_RETRY_AFTER)


def backoff(limits: Limits, attempt: int, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): capped exponential, full jitter."""
    ceiling = min(limits.max_backoff_seconds, limits.backoff_seconds * 2**attempt)
    return ceiling * (0.5 + 0.5 * rng.random())


class APIClient:
    """The server of a `APIRecipe`, reached with ``key`` (never stored or logged here).

    Args:
        recipe: the server, base model and limits.
        key: the API key (resolved from ``recipe.key_env`` or a secret by the caller).
        sleep: how to wait (tests pass a recorder); defaults to `time.sleep`.
    """

    def __init__(self, recipe: APIRecipe, key: str, sleep: Callable[[float], None] = time.sleep):
        import openai

        self.recipe, self.limits, self.sleep = recipe, recipe.limits, sleep
        self.openai = openai.OpenAI(
            base_url=recipe.base_url,
            api_key=key,
            max_retries=0,
            timeout=recipe.limits.timeout_seconds,
        )
        self.usage = Usage()
        self._usage_lock = threading.Lock()
        self._rng = random.Random()
        self._pacer = _shared(
            "pace", recipe.base_url, self.limits.requests_per_second, self._make_pacer
        )

    def _make_pacer(self) -> _Pacer:
        return _Pacer(self.limits.requests_per_second)

    def job_slot(self) -> threading.BoundedSemaphore:
        """The process-wide bound on this server's fine-tuning jobs in flight."""
        return _shared(
            "jobs",
            self.recipe.base_url,
            self.limits.jobs_in_flight,
            lambda: threading.BoundedSemaphore(self.limits.jobs_in_flight),
        )

    def count(self, usage: Usage | None = None, **counts: int) -> None:
        """Add ``counts`` to the client's usage (and to ``usage``, one copy's, if given)."""
        with self._usage_lock:
            for target in (self.usage, usage):
                if target is not None:
                    for name, value in counts.items():
                        setattr(target, name, getattr(target, name) + int(value))

    def drain(self, usage: Usage) -> dict[str, int]:
        """``usage``'s counts, and zero them (under the lock the counting threads take)."""
        with self._usage_lock:
            counts = usage.as_dict()
            for name in counts:
                setattr(usage, name, 0)
        return counts

    def call(
        self,
        what: str,
        fn: Callable,
        *args,
        usage: Usage | None = None,
        retries: int | None = None,
        **kwargs,
    ) -> Any:
        """``fn(*args, **kwargs)``, one request, with the retry rule of the module docstring.

        ``retries`` replaces ``limits.retries`` for this request.

        Raises:
            APIUnavailable: transient failures outlasted ``limits.retries``.
            DaunceError: the server refused the request (key, unknown model, bad request).
        """
        import openai

        last: Exception | None = None
        retries = self.limits.retries if retries is None else retries
        for attempt in range(retries + 1):
            self._pacer.wait()
            self.count(usage, requests=1)
            try:
                return fn(*args, **kwargs)
            except openai.RateLimitError as error:
                if _code(error) == "insufficient_quota":
                    raise DaunceError(
                        f"{what}: the account behind the key has no quota left "
                        f"({describe(error)}); add credit or raise the account's limits, then "
                        "rerun (nothing done is lost)."
                    ) from error
                last = error
            except openai.APIConnectionError as error:
                last = error
            except openai.APIStatusError as error:
                if error.status_code < 500 and error.status_code != 408:
                    raise self.refusal(what, error) from error
                last = error
            if attempt == retries:
                break
            wait = retry_after(last)
            if wait is not None and isinstance(last, openai.RateLimitError):
                self._pacer.hold(wait)  # every thread waits, not only this one
            self.count(usage, retries=1)
            self.sleep(wait if wait is not None else backoff(self.limits, attempt, self._rng))
        raise APIUnavailable(
            f"{what}: the server at {self.recipe.base_url} kept failing ({describe(last)}) "
            f"through {retries} retries. Nothing computed is lost (jobs and searches "
            "are recorded as they go): rerun the same command to resume, or raise "
            "model.recipe.limits.retries to wait longer."
        ) from last

    def refusal(self, what: str, error: Exception) -> DaunceError:
        """The `DaunceError` of a request the server refused, naming the fix."""
        status = getattr(error, "status_code", None)
        detail = describe(error)
        if status in (401, 403):
            where = (
                f"the Prefect Secret block {self.recipe.key_secret!r}"
                if self.recipe.key_secret
                else f"the environment variable {self.recipe.key_env}"
            )
            return DaunceError(
                f"{what}: the server at {self.recipe.base_url} refused the API key ({detail}); "
                f"put a valid key in {where} (model.recipe.key_env / key_secret)."
            )
        if status == 404:
            return DaunceError(f"{what}: the server has no such resource ({detail}).")
        return DaunceError(f"{what}: the server refused the request ({detail}).")

    # The server's resources -------------------------------------------------------------

    def models(self) -> list[str]:
        """The ids of the models the server serves."""
        page = self.call("list models", self.openai.models.list)
        return [model.id for model in page.data]

    def check_model(self, model: str) -> None:
        """Raise a `DaunceError` if the server is down, refuses the key or lacks ``model``.

        Checked with at most two retries: a server that does not answer at the start of a run
        is more likely a wrong address or a stopped server than a passing failure.
        """
        import openai

        try:
            self.call(f"model {model!r}", self.openai.models.retrieve, model, retries=2)
        except APIUnavailable as error:
            raise APIUnavailable(
                f"nothing usable answers at {self.recipe.base_url} ({describe(error.__cause__)}): "
                "start the server (e.g. `daunce serve-api --model <folder> --port 8000`) or fix "
                "model.recipe.base_url, then rerun."
            ) from error
        except DaunceError as error:
            if not isinstance(error.__cause__, openai.NotFoundError):
                raise
            try:
                served = self.models()
            except DaunceError as listing:
                if isinstance(listing.__cause__, openai.NotFoundError):
                    raise DaunceError(
                        f"{self.recipe.base_url} answers 404 for /models: it is no "
                        "OpenAI-compatible root. Such a base_url usually ends in /v1 (e.g. "
                        "http://127.0.0.1:8000/v1); fix model.recipe.base_url."
                    ) from listing
                raise
            if model in served:  # a server without GET /v1/models/{id}, or odd ids
                return
            raise DaunceError(
                f"the server at {self.recipe.base_url} has no model {model!r}; it serves "
                f"{served}. Set model.recipe.model to one of them."
            ) from error

    def upload(self, name: str, lines: Sequence[dict], usage: Usage | None = None) -> str:
        """Upload a JSONL training file of ``lines``; its file id."""
        import json

        # ASCII JSON: a sampled completion may hold U+2028 or U+0085, which some JSONL
        # readers take for line ends; escaped, every line is one line for any reader.
        data = "".join(json.dumps(line, ensure_ascii=True) + "\n" for line in lines).encode()
        file = self.call(
            f"upload {name}",
            self.openai.files.create,
            file=(name, data, "application/jsonl"),
            purpose="fine-tune",
            usage=usage,
        )
        return file.id

    def create_job(
        self,
        model: str,
        file_id: str,
        suffix: str,
        seed: int,
        find: Callable[[], str | None],
        usage: Usage | None = None,
    ) -> str:
        """Create a supervised fine-tuning job of ``model`` on ``file_id``; its id.

        The request is never simply sent again: when its answer is lost (a timeout, a
        dropped connection, a 429 or a 5xx), ``find()`` looks for a job of this ``suffix``
        first (it may have been created all the same), and only if there is none is the
        request sent again, after the usual wait. The job carries ``metadata.daunce_copy =
        suffix`` so that servers that filter jobs on metadata find it at once.
        """
        tune = self.recipe.fine_tune
        hyperparameters = {
            "n_epochs": tune.n_epochs,
            "learning_rate_multiplier": tune.learning_rate_multiplier,
            "batch_size": tune.batch_size,
        }
        for attempt in range(self.limits.retries + 1):
            try:
                job = self.call(
                    f"create a fine-tuning job ({suffix})",
                    self.openai.fine_tuning.jobs.create,
                    model=model,
                    training_file=file_id,
                    method={
                        "type": "supervised",
                        "supervised": {"hyperparameters": hyperparameters},
                    },
                    suffix=suffix,
                    seed=seed,
                    metadata={"daunce_copy": suffix},
                    usage=usage,
                    retries=0,
                )
            except APIUnavailable as error:
                found = find()
                if found is not None:  # created by this request, its answer lost
                    self.count(usage, jobs=1)
                    return found
                if attempt == self.limits.retries:
                    raise
                wait = retry_after(error.__cause__)
                self.count(usage, retries=1)
                self.sleep(wait if wait is not None else backoff(self.limits, attempt, self._rng))
                continue
            self.count(usage, jobs=1)
            return job.id
        raise AssertionError("unreachable")

    def job(self, job_id: str, usage: Usage | None = None):
        """The fine-tuning job ``job_id`` as the server sees it now."""
        return self.call(
            f"job {job_id}", self.openai.fine_tuning.jobs.retrieve, job_id, usage=usage
        )

    def wait(self, job_id: str, on_state: Callable | None = None, usage: Usage | None = None):
        """Poll job ``job_id`` until it ends (succeeded, failed, cancelled); the final job.

        The wait between polls starts at ``limits.poll_seconds`` and grows by half each poll
        up to ``limits.max_poll_seconds``. ``on_state(job)`` is called when the status changes.

        Raises:
            APIUnavailable: the job outlasted ``limits.job_timeout_seconds`` (it keeps running
                on the server; a rerun resumes waiting for it).
        """
        started, interval, state = time.monotonic(), self.limits.poll_seconds, None
        while True:
            job = self.job(job_id, usage=usage)
            if job.status != state:
                state = job.status
                if on_state is not None:
                    on_state(job)
            if job.status in ("succeeded", "failed", "cancelled"):
                return job
            if job.status not in PENDING:
                raise DaunceError(
                    f"job {job_id} is in a state this client does not know ({job.status!r}); "
                    "resolve it on the server (resume or cancel it), then rerun."
                )
            timeout = self.limits.job_timeout_seconds
            if timeout is not None and time.monotonic() - started > timeout:
                raise APIUnavailable(
                    f"job {job_id} is still {job.status} after {timeout:g} s "
                    "(model.recipe.limits.job_timeout_seconds); it keeps running on the server, "
                    "and rerunning the same command resumes waiting for it."
                )
            self.sleep(interval)
            interval = min(self.limits.max_poll_seconds, interval * 1.5)

    # Losses and samples -------------------------------------------------------------------

    def loss_method(self, model: str) -> str:
        """``recipe.loss``, or for ``auto`` the first method the server answers (`probe`)."""
        if self.recipe.loss != "auto":
            return self.recipe.loss
        return self.probe(model)

    def probe(self, model: str) -> str:
        """Which loss method the server supports for ``model``: ``echo`` or ``top_logprobs``.

        Raises:
            DaunceError: it supports neither (naming both and what they need).
        """
        reasons = []
        try:
            losses, _ = self.echo_losses(model, ["The sky is"], [" blue"])
            if np.isfinite(losses).all():
                return "echo"
            reasons.append("echo: no log-probabilities in the answer")
        except APIUnavailable:
            raise
        except DaunceError as error:
            reasons.append(f"echo: {error}")
        try:
            self.answer_losses(model, ["The sky is"], [" blue"])
            return "top_logprobs"
        except APIUnavailable:
            raise
        except DaunceError as error:
            reasons.append(f"top_logprobs: {error}")
        raise DaunceError(
            f"the server at {self.recipe.base_url} gives no log-probabilities DAUNCE can use for "
            f"{model!r}: neither prompt log-probabilities (/v1/completions with echo, logprobs "
            "and max_tokens 0) nor top_logprobs of a one-token answer (/v1/chat/completions). "
            f"What it answered: {'; '.join(reasons)}."
        )

    def echo_losses(
        self,
        model: str,
        prompts: Sequence[str],
        completions: Sequence[str],
        usage: Usage | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean NLL of each completion after its prompt, from prompt log-probabilities.

        The text ``prompt + completion`` is scored as one; the completion's tokens are those
        that start at or after the prompt's last character (a token that straddles the
        boundary belongs to the prompt), the rule the local server trains with.

        Returns:
            ``(losses [n] float64, tokens [n] int)``: the mean NLL and the number of
            completion tokens of each example.

        Raises:
            DaunceError: an example has no completion token, or the answer is malformed.
        """
        losses = np.empty(len(prompts))
        tokens = np.zeros(len(prompts), dtype=np.int64)
        step = self.limits.prompts_per_request
        for start in range(0, len(prompts), step):
            batch = range(start, min(start + step, len(prompts)))
            texts = [prompts[i] + completions[i] for i in batch]
            answer = self.call(
                f"log-probabilities of examples {batch.start}-{batch.stop - 1}",
                self.openai.completions.create,
                model=model,
                prompt=texts,
                echo=True,
                logprobs=0,
                max_tokens=0,
                temperature=0,
                usage=usage,
            )
            if answer.usage is not None:
                self.count(usage, prompt_tokens=answer.usage.prompt_tokens or 0)
            choices = sorted(answer.choices, key=lambda c: c.index)
            if len(choices) != len(texts):
                raise DaunceError(
                    f"the server answered {len(choices)} choices for {len(texts)} prompts; "
                    "it does not support a list of prompts: set "
                    "model.recipe.limits.prompts_per_request to 1."
                )
            for i, choice in zip(batch, choices, strict=True):
                losses[i], tokens[i] = _completion_nll(choice, len(prompts[i]), i)
        return losses, tokens

    def answer_losses(
        self,
        model: str,
        prompts: Sequence[str],
        answers: Sequence[str],
        usage: Usage | None = None,
        top: int = 20,
    ) -> tuple[np.ndarray, np.ndarray]:
        """NLL of a one-token answer, from the top log-probabilities of the first token.

        Returns:
            ``(losses [n], censored [n] bool)``: where the answer is not among the ``top``
            most likely tokens, its loss is bounded below by the least likely one listed, and
            ``censored`` says so.
        """
        losses = np.empty(len(prompts))
        censored = np.zeros(len(prompts), dtype=bool)
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            reply = self.call(
                f"top log-probabilities of example {i}",
                self.openai.chat.completions.create,
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=top,
                usage=usage,
            )
            if reply.usage is not None:
                self.count(usage, prompt_tokens=reply.usage.prompt_tokens or 0)
            content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
            if not content or not content[0].top_logprobs:
                raise DaunceError(f"example {i}: the answer carries no top_logprobs.")
            listed = {entry.token: entry.logprob for entry in content[0].top_logprobs}
            match = [lp for token, lp in listed.items() if token.strip() == answer.strip()]
            if match:
                losses[i] = -max(match)
            else:
                losses[i], censored[i] = -min(listed.values()), True
        if censored.mean() > 0.5:
            raise DaunceError(
                f"{int(censored.sum())} of {len(answers)} answers are not among the {top} most "
                "likely first tokens: top_logprobs reads one-token answers only, and these look "
                "longer. Use a server that gives prompt log-probabilities (loss: echo), or data "
                "whose completions are one token."
            )
        return losses, censored

    def sample(
        self,
        model: str,
        prompts: Sequence[str],
        seed: int,
        usage: Usage | None = None,
        max_tokens: int | None = None,
    ) -> list[str]:
        """One completion per prompt sampled from ``model`` at temperature 1 (seeded).

        At most ``max_tokens`` tokens each (default ``recipe.sample_max_tokens``).
        """
        out: list[str] = []
        step = self.limits.prompts_per_request
        for start in range(0, len(prompts), step):
            batch = list(prompts[start : start + step])
            answer = self.call(
                f"samples for prompts {start}-{start + len(batch) - 1}",
                self.openai.completions.create,
                model=model,
                prompt=batch,
                max_tokens=max_tokens or self.recipe.sample_max_tokens,
                temperature=1.0,
                seed=int(seed + start) % 2**31,
                usage=usage,
            )
            if answer.usage is not None:
                self.count(
                    usage,
                    prompt_tokens=answer.usage.prompt_tokens or 0,
                    completion_tokens=answer.usage.completion_tokens or 0,
                )
            if len(answer.choices) != len(batch):
                raise DaunceError(
                    f"the server answered {len(answer.choices)} samples for {len(batch)} "
                    "prompts; it does not sample a list of prompts: set "
                    "model.recipe.limits.prompts_per_request to 1."
                )
            out.extend(choice.text for choice in sorted(answer.choices, key=lambda c: c.index))
        return out


def _completion_nll(choice, prompt_chars: int, i: int) -> tuple[float, int]:
    """Mean NLL of the tokens of ``choice`` that start at or after ``prompt_chars``."""
    logprobs = choice.logprobs
    if logprobs is None or logprobs.token_logprobs is None or logprobs.text_offset is None:
        raise DaunceError(
            f"example {i}: the server answered without prompt log-probabilities "
            "(token_logprobs and text_offset)."
        )
    if len(logprobs.token_logprobs) != len(logprobs.text_offset):
        raise DaunceError(
            f"example {i}: the server's token_logprobs and text_offset differ in length "
            f"({len(logprobs.token_logprobs)} and {len(logprobs.text_offset)})."
        )
    values = [
        lp
        for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset, strict=True)
        if offset >= prompt_chars and lp is not None
    ]
    if not values:
        raise DaunceError(
            f"example {i}: no token of its completion starts after its prompt (the completion "
            "is empty, or the tokenizer merges it into the prompt's last token); start each "
            "completion with a space or end each prompt with a separator (task.separator)."
        )
    return -float(np.mean(values)), len(values)


def describe(error: Exception | None) -> str:
    """A short account of a failed request: status and the server's message."""
    if error is None:
        return "no answer"
    status = getattr(error, "status_code", None)
    body = getattr(error, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else None
    message = message or getattr(error, "message", None) or str(error) or type(error).__name__
    return f"{status} {message}" if status else f"{type(error).__name__}: {message}"


def _code(error: Exception) -> str | None:
    """The ``error.code`` of a failed response's body, if any."""
    body = getattr(error, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    return inner.get("code") if isinstance(inner, dict) else getattr(error, "code", None)

"""What an API run names: the server, the base model, where the key lives, how copies fine-tune.

A run configuration's ``model.recipe`` for ``model.access: api``::

    recipe:
      kind: api
      base_url: http://127.0.0.1:8000/v1     # any OpenAI-compatible server
      model: tiny                            # the base model θ0, as the server names it
      key_env: DAUNCE_API_KEY                # the environment variable holding the key, or
      # key_secret: my-block                 # a Prefect Secret block (never the key itself)
      loss: auto                             # echo | top_logprobs | auto (ask the server)
      fine_tune: {n_epochs: 1, learning_rate_multiplier: 1.0, batch_size: 8}
      limits: {jobs_in_flight: 4, requests_per_second: 10}

`fine_tune` (and `loss`, `sample_max_tokens`) decide which copies a run holds; `limits` only how
fast it gets them, and `base_url` only where the model is reached, so they are kept out of the
run's identity (`identity_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from daunce_core.conversion import from_dict
from daunce_core.errors import DaunceError

LOSS_METHODS = ("auto", "echo", "top_logprobs")
"""How losses are read: ``echo`` (``/v1/completions`` with ``echo`` and ``logprobs``: the
log-probability of every prompt token, so the mean NLL of any completion), ``top_logprobs``
(``/v1/chat/completions``: the log-probability of a one-token answer among the most likely
first tokens), ``auto`` (``echo`` where the server answers it, else ``top_logprobs``)."""


@dataclass(frozen=True)
class FineTune:
    """The hyperparameters of every copy's fine-tuning job (OpenAI's names).

    Small steps keep the copies in the linear regime around θ0 (DESIGN §1): one epoch and the
    server's base learning rate by default.
    """

    n_epochs: int = 1
    learning_rate_multiplier: float = 1.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.batch_size < 1:
            raise DaunceError(
                f"fine_tune.n_epochs and fine_tune.batch_size must be >= 1; got "
                f"{self.n_epochs} and {self.batch_size}."
            )
        if not self.learning_rate_multiplier > 0:
            raise DaunceError(
                "fine_tune.learning_rate_multiplier must be > 0; got "
                f"{self.learning_rate_multiplier}."
            )


@dataclass(frozen=True)
class Limits:
    """How hard the run may press a (possibly paid) service, and how patiently it waits.

    Attributes:
        jobs_in_flight: fine-tuning jobs created and not yet finished, at most (per process).
        requests_per_second: requests sent per second, at most (per process and server).
        prompts_per_request: texts per ``/v1/completions`` request.
        retries: how many times one request is sent again after a 429, a 5xx, a timeout or a
            dropped connection, waiting ``backoff_seconds · 2^attempt`` (with jitter, at most
            ``max_backoff_seconds``) or the server's ``Retry-After``.
        job_attempts: fine-tuning jobs per copy at most (a failed job is retried as a new
            job); every attempt is recorded.
        timeout_seconds: one request's timeout.
        poll_seconds: first wait between polls of a job; it grows by half each poll up to
            ``max_poll_seconds``.
        job_timeout_seconds: how long to wait for one job before giving up (6 hours by
            default; None: forever); the job is left running and a rerun resumes waiting for
            it.
    """

    jobs_in_flight: int = 4
    requests_per_second: float = 10.0
    prompts_per_request: int = 32
    retries: int = 8
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    job_attempts: int = 3
    timeout_seconds: float = 120.0
    poll_seconds: float = 2.0
    max_poll_seconds: float = 30.0
    job_timeout_seconds: float | None = 21600.0

    def __post_init__(self) -> None:
        for name in ("jobs_in_flight", "prompts_per_request", "job_attempts"):
            if getattr(self, name) < 1:
                raise DaunceError(f"limits.{name} must be >= 1; got {getattr(self, name)}.")
        if self.retries < 0:
            raise DaunceError(f"limits.retries must be >= 0; got {self.retries}.")
        for name in (
            "requests_per_second",
            "backoff_seconds",
            "max_backoff_seconds",
            "timeout_seconds",
            "poll_seconds",
            "max_poll_seconds",
        ):
            if not getattr(self, name) > 0:
                raise DaunceError(f"limits.{name} must be > 0; got {getattr(self, name)}.")
        if self.job_timeout_seconds is not None and not self.job_timeout_seconds > 0:
            raise DaunceError(
                f"limits.job_timeout_seconds must be > 0 or null; got {self.job_timeout_seconds}."
            )


@dataclass(frozen=True)
class APIRecipe:
    """The ``model.recipe`` of an API run (module docstring).

    Attributes:
        base_url: the server's OpenAI-compatible root, ending in ``/v1``.
        model: the base model's id on that server (θ0).
        key_env: the environment variable that holds the API key.
        key_secret: the name of a Prefect Secret block holding the key (instead of
            ``key_env``).
        loss: `LOSS_METHODS`.
        fine_tune: every copy's job hyperparameters.
        sample_max_tokens: longest completion sampled from θ0 for the sampled-label form.
        end_text: text appended to every completion when its loss is read, so that the loss
            covers the end token a fine-tuned model is trained to emit (``<|endoftext|>`` for
            GPT-2 tokenizers; the local server reads it as its tokenizer's end token); None
            (the default) reads the completion's own tokens only.
        limits: rate, concurrency, retries and patience (not part of the run's identity).
    """

    base_url: str
    model: str
    kind: Literal["api"] = "api"
    key_env: str = "OPENAI_API_KEY"
    key_secret: str | None = None
    loss: Literal["auto", "echo", "top_logprobs"] = "auto"
    fine_tune: FineTune = field(default_factory=FineTune)
    sample_max_tokens: int = 64
    end_text: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise DaunceError(
                f"model.recipe.base_url must be an http(s) URL such as "
                f"http://127.0.0.1:8000/v1; got {self.base_url!r}."
            )
        if url.username or url.password or "key" in url.query.lower():
            raise DaunceError(
                "model.recipe.base_url must not carry credentials; put the key in the "
                "environment variable named by key_env (or a Prefect Secret block, key_secret)."
            )
        if not self.model.strip():
            raise DaunceError("model.recipe.model must name the base model on the server.")
        if not self.key_env.strip() and not self.key_secret:
            raise DaunceError("model.recipe needs key_env (an environment variable's name).")
        if self.loss not in LOSS_METHODS:
            raise DaunceError(
                f"model.recipe.loss must be one of {LOSS_METHODS}; got {self.loss!r}."
            )
        if self.sample_max_tokens < 1:
            raise DaunceError(
                f"model.recipe.sample_max_tokens must be >= 1; got {self.sample_max_tokens}."
            )

    @property
    def identity_fields(self) -> dict:
        """What decides the copies: the model, how it is fine-tuned and how losses are read.

        Not the limits, where the key is read, or the server's address: a server that moves
        (a new port, a new host) serves the same model, and its run, copies and paid jobs are
        kept.
        """
        return {
            "model": self.model,
            "loss": self.loss,
            "fine_tune": {
                "n_epochs": self.fine_tune.n_epochs,
                "learning_rate_multiplier": self.fine_tune.learning_rate_multiplier,
                "batch_size": self.fine_tune.batch_size,
            },
            "sample_max_tokens": self.sample_max_tokens,
            "end_text": self.end_text,
        }


def parse_api_recipe(recipe: dict) -> APIRecipe:
    """An `APIRecipe` from ``model.recipe``, with errors naming the field."""
    if isinstance(recipe, dict) and ("key" in recipe or "api_key" in recipe):
        raise DaunceError(
            "model.recipe must not hold the API key itself (it would be stored in the lineage "
            "and exports); name the environment variable that holds it with key_env, or a "
            "Prefect Secret block with key_secret."
        )
    return from_dict(APIRecipe, recipe, "model.recipe")

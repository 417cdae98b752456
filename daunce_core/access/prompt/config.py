"""What a strict black-box run names: the log-probability server, the prompt search, a budget.

A run configuration's ``model.recipe`` for ``model.access: prompt``::

    recipe:
      kind: prompt
      base_url: http://127.0.0.1:8000/v1     # any server that answers log-probabilities
      model: tiny                            # θ0, as the server names it
      key_env: DAUNCE_API_KEY                # the environment variable holding the key
      loss: auto                             # echo | top_logprobs | auto (ask the server)
      search: {length: 4, candidates: 64, samples: 4, batch_size: 16, steps: 8}
      budget: {calls: 2000, tokens: 400000}  # per copy, for its search (null: no bound)
      limits: {requests_per_second: 10}

Nothing is fine-tuned and no gradient is read: the only operation is "the log-probability of
this text" (the paper's strict black-box access, §5). `search` and `budget` decide which
copies a run holds, so they are part of its identity; `limits`, where the key is read and the
server's address are not (`PromptRecipe.identity_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from daunce_core.access.api.config import APIRecipe, Limits
from daunce_core.conversion import from_dict
from daunce_core.errors import DaunceError


@dataclass(frozen=True)
class PromptSearch:
    """How each copy learns its prompt (BDPL: Diao et al., TMLR 2023).

    The prompt has ``length`` positions; each is a categorical distribution over the same
    ``candidates`` phrases mined from the training texts (`search.mine_candidates`). A step
    samples ``samples`` prompts, reads their losses on ``batch_size`` examples of the copy's
    subset, and moves the distributions by the variance-reduced policy gradient (clipped to
    norm ``clip``, an AdamW step of ``learning_rate`` and ``weight_decay``, each position
    projected back onto the simplex).

    Attributes:
        length: positions of the prompt.
        candidates: phrases each position chooses among.
        max_words: the longest candidate phrase, in words.
        samples: prompts sampled per step (at least 2: the baseline is their mean loss).
        batch_size: training examples of the copy's subset per step.
        steps: steps per copy at most (the budget may stop a copy sooner). 8 by evidence
            (README, "Strict black-box"): more search drives every copy toward the same
            generic prompt, and LDS and backdoor retrieval fall (32 steps: 0.44 and 0.71 of
            the best); 1 and 8 steps tie on the worst case of the two benchmarks (0.86 of the
            best), and 8 retrieves the backdoor better.
        learning_rate, weight_decay, clip: the AdamW step and the gradient clipping.
        separator: the text between the learned prompt and each example's prompt.
        checkpoint_steps: a copy's search state is written every this many steps, so that a
            killed run resumes mid-copy (not part of the run's identity).
    """

    length: int = 4
    candidates: int = 64
    max_words: int = 2
    samples: int = 4
    batch_size: int = 16
    steps: int = 8
    learning_rate: float = 0.05
    weight_decay: float = 0.01
    clip: float = 10.0
    separator: str = "\n"
    checkpoint_steps: int = 1

    def __post_init__(self) -> None:
        for name, low in (
            ("length", 1),
            ("candidates", 2),
            ("max_words", 1),
            ("samples", 2),
            ("batch_size", 1),
            ("steps", 1),
            ("checkpoint_steps", 1),
        ):
            if getattr(self, name) < low:
                why = " (the baseline is their mean loss)" if name == "samples" else ""
                raise DaunceError(
                    f"search.{name} must be >= {low}{why}; got {getattr(self, name)}."
                )
        for name in ("learning_rate", "clip"):
            if not getattr(self, name) > 0:
                raise DaunceError(f"search.{name} must be > 0; got {getattr(self, name)}.")
        if not self.weight_decay >= 0:
            raise DaunceError(f"search.weight_decay must be >= 0; got {self.weight_decay}.")

    @property
    def identity_fields(self) -> dict:
        """Everything but ``checkpoint_steps`` (how often state is saved changes no copy)."""
        return {
            "length": self.length,
            "candidates": self.candidates,
            "max_words": self.max_words,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "clip": self.clip,
            "separator": self.separator,
        }


@dataclass(frozen=True)
class Budget:
    """What one copy's search may spend, at most (None: no bound).

    Attributes:
        calls: loss queries of the search (one text whose log-probabilities are read; a
            step makes ``search.samples × search.batch_size``). Counted in texts, not
            requests, so that neither ``limits.prompts_per_request`` nor a retried request
            changes which copy the budget makes.
        tokens: prompt tokens the server reads for the search (known only after each step:
            a step is taken if the largest step so far still fits).

    Measuring the copy's final prompt on every training example and query costs ``n + m``
    loss queries more; the run prints both before it starts.
    """

    calls: int | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("calls", "tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DaunceError(f"budget.{name} must be >= 1 or null; got {value}.")


@dataclass(frozen=True)
class PromptRecipe:
    """The ``model.recipe`` of a strict black-box run (module docstring).

    The server fields (``base_url``, ``model``, ``key_env``/``key_secret``, ``loss``,
    ``end_text``, ``sample_max_tokens``, ``limits``) mean what they mean for
    ``model.access: api`` (`daunce_core.access.api.config.APIRecipe`).
    """

    base_url: str
    model: str
    kind: Literal["prompt"] = "prompt"
    key_env: str = "OPENAI_API_KEY"
    key_secret: str | None = None
    loss: Literal["auto", "echo", "top_logprobs"] = "auto"
    sample_max_tokens: int = 64
    end_text: str | None = None
    search: PromptSearch = field(default_factory=PromptSearch)
    budget: Budget = field(default_factory=Budget)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.server  # noqa: B018 - the server fields are checked as an API recipe's
        step = self.search.samples * self.search.batch_size
        if self.budget.calls is not None and self.budget.calls < step:
            raise DaunceError(
                f"budget.calls={self.budget.calls} cannot pay for one search step "
                f"(search.samples × search.batch_size = {step} loss queries): every copy "
                f"would be the same untrained prompt. Raise budget.calls to at least {step}, "
                "or lower search.samples or search.batch_size."
            )

    @property
    def server(self) -> APIRecipe:
        """The log-probability server, as the API client reaches it."""
        return APIRecipe(
            base_url=self.base_url,
            model=self.model,
            key_env=self.key_env,
            key_secret=self.key_secret,
            loss=self.loss,
            sample_max_tokens=self.sample_max_tokens,
            end_text=self.end_text,
            limits=self.limits,
        )

    @property
    def identity_fields(self) -> dict:
        """What decides the copies: the model, how losses are read, the search and its budget."""
        return {
            "kind": "prompt",
            "model": self.model,
            "loss": self.loss,
            "sample_max_tokens": self.sample_max_tokens,
            "end_text": self.end_text,
            "search": self.search.identity_fields,
            "budget": {"calls": self.budget.calls, "tokens": self.budget.tokens},
        }


REFUSED_FIELDS = {
    "fine_tune": (
        "model.access: prompt never fine-tunes (strict black-box: loss queries only); its "
        "copies are learned prompts, set by model.recipe.search. To fine-tune copies through "
        "an API, use model.access: api."
    ),
    "gradients": (
        "model.access: prompt reads no gradients (strict black-box: loss queries only). For "
        "gradients use model.access: torch or hf_lora."
    ),
}


def parse_prompt_recipe(recipe: dict) -> PromptRecipe:
    """A `PromptRecipe` from ``model.recipe``, with errors naming the field."""
    if isinstance(recipe, dict):
        if "key" in recipe or "api_key" in recipe:
            raise DaunceError(
                "model.recipe must not hold the API key itself (it would be stored in the "
                "lineage and exports); name the environment variable that holds it with "
                "key_env, or a Prefect Secret block with key_secret."
            )
        for name, why in REFUSED_FIELDS.items():
            if name in recipe:
                raise DaunceError(f"model.recipe.{name}: {why}")
    return from_dict(PromptRecipe, recipe, "model.recipe")

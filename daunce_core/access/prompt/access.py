"""The ``prompt`` model access: strict black-box copies, learned as discrete prompts.

The paper's "strict black-box access" (§5): no parameters, no gradients, no fine-tuning; the
one operation is reading the log-probability of a text (`APIClient.echo_losses`, or the
top log-probabilities of a one-token answer). Copy k is a prompt of ``search.length`` phrases
prepended to every example's prompt, learned by BDPL (`search`) to minimise the black-box
perturbed objective of Table 2 on the copy's random subset ``D^k``:

* ``hessian``: the mean loss ``L_i`` over the batch (observed completions, or with
  ``labels: sampled`` completions sampled from θ0 once per copy, as the API kind does);
* ``efim``: the mean of ``½ L_i²``.

Per copy (`PromptAccess.train`): mine the candidate phrases (shared by all copies), then per
step sample ``search.samples`` prompts from the copy's distributions (seeded by ``(seed, k,
step)``), read the losses of the step's batch under each, and take the policy-gradient step.
The state (distributions, AdamW moments, calls and tokens spent, sampled completions) is
written to the copy's state file every ``search.checkpoint_steps`` steps, so a killed run
resumes mid-copy and ends with the copy an uninterrupted run makes. The search stops after
``search.steps`` steps or before a step the budget cannot pay for. The copy is the most
likely phrase of each position; its losses on every training example and query are the
copy's rows of ``A`` and ``B``.

A copy is saved as a small JSON file (its prompt, the distributions, what it cost). With a
deterministic server (the same text gives the same log-probabilities) a copy depends only on
``(seed, k)``, so a lost file is searched again (`Capabilities.deterministic`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from daunce_core.access.api.access import ServerAccess, TextExamples
from daunce_core.access.api.client import APIClient, APIUnavailable, Usage
from daunce_core.access.base import (
    Capabilities,
    CopiesFailed,
    CopyJournal,
)
from daunce_core.access.prompt.config import Budget, PromptSearch
from daunce_core.access.prompt.search import (
    PolicyState,
    adamw_step,
    mine_candidates,
    policy_gradient,
    sample_prompts,
)
from daunce_core.errors import DaunceError
from daunce_core.method.config import DaunceConfig
from daunce_core.method.draws import Stream, draw_perturbation, epoch_order, stream_rng

STATE_VERSION = 1

FIT_EXAMPLES = 8
"""The longest examples of each split (in characters) read under the longest prompt before any
search (`PromptAccess.check_fits`)."""


@dataclass
class PromptCopies:
    """Learned prompts, in the order of ``ks``.

    Attributes:
        ks: the copies.
        prompts: each copy's prompt text (its phrases and the separator).
        states: each copy's final search state (None for a copy loaded from its file).
        stopped: why each copy's search ended (``steps``, ``budget.calls``, ``budget.tokens``).
    """

    ks: list[int]
    prompts: list[str]
    states: list[PolicyState | None]
    stopped: list[str]


class PromptAccess(ServerAccess):
    """Perturbed copies as prompts learned over loss queries (module docstring).

    Args:
        client: the log-probability server, with the key and limits.
        base_model: θ0's id on the server.
        loss_method: ``echo`` or ``top_logprobs`` (resolved, not ``auto``).
        train_set: the training examples (text).
        query_set: the queries (text).
        config: the run's DAUNCE settings (K, subset ratio, objective, seed).
        search: how each copy's prompt is learned.
        budget: what one copy's search may spend.
    """

    kind: ClassVar[str] = "prompt"
    capabilities: ClassVar[Capabilities] = Capabilities(
        gradients=False,
        fine_tuning=False,
        custom_objective=True,
        deterministic=True,
        bootstrap=True,
    )
    copy_suffix: ClassVar[str] = ".prompt.json"

    def __init__(
        self,
        client: APIClient,
        base_model: str,
        loss_method: str,
        train_set: TextExamples,
        query_set: TextExamples,
        config: DaunceConfig,
        search: PromptSearch | None = None,
        budget: Budget | None = None,
    ) -> None:
        super().__init__(client, base_model, loss_method, train_set, query_set, config)
        check_prompt_objective(config)
        self.search = search or PromptSearch()
        self.budget = budget or Budget()
        texts = [p + c for p, c in zip(train_set.prompts, train_set.completions, strict=True)]
        self.candidates = mine_candidates(texts, self.search.candidates, self.search.max_words)
        self._fits = False  # check_fits has passed (once per access)

    @property
    def calls_per_step(self) -> int:
        """Loss queries of one search step: its samples × its batch (texts, not requests)."""
        return self.search.samples * self.search.batch_size

    def prompt_text(self, chosen: Sequence[int]) -> str:
        """The prompt of candidate indices ``chosen``: the phrases, then the separator."""
        return " ".join(self.candidates[int(j)] for j in chosen) + self.search.separator

    # Training ------------------------------------------------------------------------

    def train(self, ks: Sequence[int], journal: CopyJournal | None = None) -> PromptCopies:
        """Learn the prompts of copies ``ks``, concurrently (their requests share the pacer).

        Without a journal (library use) nothing is checkpointed.

        Raises:
            CopiesFailed: some copies failed (each named); it carries those that did not.
        """
        self.check_fits()
        done, failed = self._each([int(k) for k in ks], lambda k: self._recorded(k, journal))
        trained = PromptCopies(
            list(done),
            [self.prompt_text(state.best()) for state, _ in done.values()],
            [state for state, _ in done.values()],
            [why for _, why in done.values()],
        )
        if failed:
            raise CopiesFailed(trained.ks, trained, failed)
        return trained

    def _recorded(self, k: int, journal: CopyJournal | None) -> tuple[PolicyState, str]:
        """`_copy`, with what a failed copy spent written to its record before the error."""
        try:
            return self._copy(k, journal)
        except Exception:
            counts = self.take_usage(k) if journal is not None else None
            if counts and any(counts.values()):
                journal.record_usage(k, counts)
            raise

    def check_fits(self) -> None:
        """Refuse, before any search, a prompt that cannot fit before the longest examples.

        The longest prompt the search can make repeats the phrase of the most tokens (counted
        by the server, where it echoes: one loss query per candidate) ``length`` times; it is read
        once before the `FIT_EXAMPLES` longest training examples and queries (in characters:
        the tokenizer is the server's), and the server's refusal is named with the fix. A
        rarer example, longer in tokens than all of those, is refused by the server during
        the search, named with the same fix.
        """
        if self._fits:
            return
        s = self.search
        if self.loss_method == "echo":
            separators = [s.separator] * len(self.candidates)
            phrases = [" " + c for c in self.candidates]
            _, counts = self.client.echo_losses(self.base_model, separators, phrases)
        else:
            counts = np.array([len(c) for c in self.candidates])
        # Every position may choose the same phrase: the longest prompt repeats the longest.
        prefix = " ".join([self.candidates[int(np.argmax(counts))]] * s.length) + s.separator
        prompts, answers = [], []
        for split in (self.train_set, self.query_set):
            sizes = [len(p) + len(c) for p, c in zip(split.prompts, split.completions, strict=True)]
            for i in np.argsort(sizes, kind="stable")[::-1][:FIT_EXAMPLES]:
                prompts.append(prefix + split.prompts[i])
                answers.append(split.completions[i])
        try:
            self.losses(self.base_model, TextExamples(prompts, answers))
        except DaunceError as error:
            if isinstance(error, APIUnavailable) or "context" not in str(error):
                raise
            raise DaunceError(
                f"the longest examples do not fit behind the longest prompt the search can "
                f"make ({prefix.strip()!r}): {error} Lower model.recipe.search.length or "
                "search.max_words (or shorten the examples)."
            ) from error
        self._fits = True

    def _copy(self, k: int, journal: CopyJournal | None) -> tuple[PolicyState, str]:
        """Run copy ``k``'s search to its end (resuming a saved state); the state and why."""
        s, usage = self.search, self.usage_of(k)
        path = journal.state_file(k) if journal is not None else None
        state, completions = self._resume(k, path)
        draw = draw_perturbation(
            self.num_train,
            k,
            seed=self.config.seed,
            subset_ratio=self.config.subset_ratio,
            antithetic=self.config.antithetic,
        )
        if completions is None:
            completions = self._completions(k, draw.subset, usage)
            self._save_state(path, k, state, completions)
        orders: dict[int, np.ndarray] = {}
        while True:
            stopped = self._stop(state)
            if stopped:
                break
            batch = self._batch(draw, state.step, orders)
            rng = stream_rng(self.config.seed, k, Stream.PROMPT_SEARCH, state.step)
            chosen = sample_prompts(state.probs, s.samples, rng)
            spent = Usage()
            try:
                losses = self._losses(chosen, batch, completions, draw.subset, spent)
            except APIUnavailable:
                raise
            except DaunceError as error:
                if "context" not in str(error):
                    raise
                raise DaunceError(
                    f"copy {k}, search step {state.step}: a sampled prompt with the batch's "
                    f"examples is longer than θ0's context window on the server ({error}). "
                    "Lower model.recipe.search.length or search.max_words (or shorten the "
                    "examples); copies already done are kept."
                ) from error
            finally:
                with self._lock:
                    usage.add(spent)
            values = self._objective(losses)
            if not np.isfinite(values).all():
                raise DaunceError(
                    f"copy {k}: the server answered non-finite losses at search step "
                    f"{state.step}; check the model on the server."
                )
            before = copy.deepcopy(state)
            adamw_step(
                state,
                policy_gradient(state.probs, chosen, values),
                s.learning_rate,
                s.weight_decay,
                s.clip,
            )
            state.calls += self.calls_per_step
            state.tokens += spent.prompt_tokens
            state.largest = max(state.largest, spent.prompt_tokens)
            state.objective.append(float(values.mean()))
            if self.budget.tokens is not None and state.tokens > self.budget.tokens:
                if before.step == 0:
                    raise DaunceError(
                        f"copy {k}: budget.tokens={self.budget.tokens:,} cannot pay for one "
                        f"search step: the first read {state.tokens:,} prompt tokens. Raise "
                        f"budget.tokens (to about {state.tokens * self.search.steps:,} for all "
                        f"{self.search.steps} steps) or lower search.samples or "
                        "search.batch_size."
                    )
                # A step larger than any before passed the budget: it is not taken (what it
                # read is in the usage), so the copy is the same whenever the search resumes.
                state, stopped = before, "budget.tokens"
                break
            if state.step % s.checkpoint_steps == 0 and self._stop(state) is None:
                self._checkpoint(k, journal, path, state, completions)
        self._checkpoint(k, journal, path, state, completions, final=stopped)
        return state, stopped

    def _stop(self, state: PolicyState) -> str | None:
        """Why the search ends before its next step, if it does.

        The next step is paid for if the calls stay within ``budget.calls`` and the tokens
        spent plus the largest step so far within ``budget.tokens`` (the first step is
        always taken: no count of its tokens exists before it).
        """
        if state.step >= self.search.steps:
            return "steps"
        b = self.budget
        if b.calls is not None and state.calls + self.calls_per_step > b.calls:
            return "budget.calls"
        if b.tokens is not None and state.step > 0 and state.tokens + state.largest > b.tokens:
            return "budget.tokens"
        return None

    def _batch(self, draw, step: int, orders: dict[int, np.ndarray]) -> np.ndarray:
        """Positions in the subset of step ``step``'s examples: the subset visited in epochs."""
        size, width = len(draw.subset), self.search.batch_size
        out = np.empty(width, dtype=np.int64)
        for j, position in enumerate(range(step * width, (step + 1) * width)):
            epoch, offset = divmod(position, size)
            if epoch not in orders:
                order = epoch_order(draw, epoch, self.config.seed)
                orders[epoch] = np.searchsorted(draw.subset, order)
            out[j] = orders[epoch][offset]
        return out

    def _completions(self, k: int, subset: np.ndarray, usage: Usage) -> list[str]:
        """The completions the copy's objective reads for its subset: observed or sampled."""
        if self.config.objective.labels != "sampled":
            return [self.train_set.completions[i] for i in subset]
        seed = int(stream_rng(self.config.seed, k, Stream.API_SAMPLES, 0).integers(0, 2**31 - 1))
        prompts = [self.train_set.prompts[i] for i in subset]
        sampled = self.client.sample(self.base_model, prompts, seed, usage)
        if not self.client.recipe.end_text and any(not c for c in sampled):
            empty = [int(subset[i]) for i, c in enumerate(sampled) if not c][:5]
            raise DaunceError(
                f"copy {k}: θ0 sampled empty completions for examples {empty}, whose loss "
                "cannot be read; set model.recipe.end_text (e.g. '<|endoftext|>') so that the "
                "end token is read as part of every completion."
            )
        return sampled

    def _losses(self, chosen, batch, completions, subset, usage: Usage) -> np.ndarray:
        """Losses ``[samples, batch]`` of the batch's examples under each sampled prompt."""
        prompts, answers = [], []
        for row in chosen:
            prefix = self.prompt_text(row)
            for position in batch:
                prompts.append(prefix + self.train_set.prompts[subset[position]])
                answers.append(completions[position])
        read = self.losses(self.base_model, TextExamples(prompts, answers), usage)
        return read.reshape(len(chosen), len(batch))

    def _objective(self, losses: np.ndarray) -> np.ndarray:
        """Each sampled prompt's black-box objective on the batch (Table 2), ``[samples]``."""
        if self.config.objective.variant == "efim":
            return (0.5 * losses**2).mean(axis=1)
        return losses.mean(axis=1)

    # Search state ---------------------------------------------------------------------

    def _state_key(self, k: int) -> dict:
        """What a saved state must match to be resumed: the copy and what decides it."""
        c = self.config
        return {
            "version": STATE_VERSION,
            "k": k,
            "seed": c.seed,
            "subset_ratio": c.subset_ratio,
            "antithetic": c.antithetic,
            "objective": [c.objective.variant, c.objective.labels],
            "search": self.search.identity_fields,
            "base_model": self.base_model,
            "loss_method": self.loss_method,
            "candidates": self.candidates,
        }

    def _resume(self, k: int, path: Path | None) -> tuple[PolicyState, list[str] | None]:
        """Copy ``k``'s saved search state if one matches this run, else a fresh one.

        A damaged or foreign state file is set aside (renamed ``.damaged``) and the search
        starts again: it only costs queries, and the copy is the same either way.
        """
        fresh = PolicyState.start(self.search.length, len(self.candidates))
        if path is None or not path.exists():
            return fresh, None
        try:
            saved = json.loads(path.read_text())
            if saved["key"] != self._state_key(k):
                raise ValueError("it was written by other settings")
            state = PolicyState.from_dict(saved["state"])
            if state.probs.shape != fresh.probs.shape:
                raise ValueError("its distributions have another shape")
            completions = list(saved["completions"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            path.replace(path.with_name(path.name + ".damaged"))
            print(f"copy {k}: its search state {path.name} was not usable ({error}); set aside")
            return fresh, None
        if state.step:
            print(f"copy {k}: resuming its search at step {state.step}/{self.search.steps}")
        return state, completions

    def _save_state(self, path, k, state, completions, stopped: str | None = None) -> None:
        if path is None:
            return
        partial = path.with_name(path.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(
            json.dumps(
                {
                    "key": self._state_key(k),
                    "state": state.as_dict(),
                    "completions": completions,
                    "stopped": stopped,
                }
            )
        )
        partial.replace(path)

    def _checkpoint(self, k, journal, path, state, completions, final: str | None = None):
        """Save the state, add the usage to the record, show and record the progress."""
        self._save_state(path, k, state, completions, final)
        if journal is None:
            return
        counts = self.take_usage(k) or {}
        if final:  # the budget's own counts, once: what the record lacks of the state's totals
            recorded = journal.recorded_usage(k)
            counts["search_calls"] = state.calls - recorded.get("search_calls", 0)
            counts["search_tokens"] = state.tokens - recorded.get("search_tokens", 0)
        if any(counts.values()):
            journal.record_usage(k, counts)
        b, s = self.budget, self.search
        calls = f"{state.calls:,}" + (f" of {b.calls:,}" if b.calls else "")
        tokens = f"{state.tokens:,}" + (f" of {b.tokens:,}" if b.tokens else "")
        last = f"objective {state.objective[-1]:.4f}, " if state.objective else ""
        where = f"stopped by {final}" if final else "searching"
        line = f"{where}: step {state.step}/{s.steps}, {last}{calls} calls, {tokens} tokens"
        journal.record_job_state(k, line)
        every = max(1, s.steps // 5)
        if final or state.step % every == 0:
            print(f"copy {k}: {line}", flush=True)

    # Losses ----------------------------------------------------------------------------

    def readers(self, trained: PromptCopies) -> list[tuple[str, str]]:
        """θ0, with each copy's prompt before every example's prompt."""
        return [(self.base_model, prompt) for prompt in trained.prompts]

    # Saved copies ------------------------------------------------------------------------

    def save_copy(self, trained: PromptCopies, g: int, path: Path) -> None:
        """Write copy ``g``'s prompt (and its search's end) to ``path`` (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = trained.states[g]
        saved = {"k": trained.ks[g], "prompt": trained.prompts[g], "base_model": self.base_model}
        if state is not None:
            saved |= {
                "phrases": [self.candidates[int(j)] for j in state.best()],
                "steps": state.step,
                "stopped": trained.stopped[g],
                "calls": state.calls,
                "tokens": state.tokens,
                "objective": state.objective,
                "probs": state.probs.tolist(),
            }
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(saved, indent=1))
        partial.replace(path)

    def load_copies(self, paths: Sequence[Path]) -> PromptCopies:
        """The copies saved by `save_copy`, in order."""
        ks, prompts = [], []
        for path in paths:
            try:
                saved = json.loads(Path(path).read_text())
                ks.append(int(saved["k"]))
                prompts.append(str(saved["prompt"]))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise DaunceError(
                    f"the saved prompt copy {path} is unreadable ({error}); delete it and its "
                    "record to search that copy again."
                ) from error
        return PromptCopies(ks, prompts, [None] * len(ks), ["saved"] * len(ks))


def check_prompt_objective(config: DaunceConfig) -> None:
    """Refuse what a prompt search cannot do: the margin objective and perturbation knobs."""
    objective = config.objective
    ignored = [
        name
        for name, given in (
            ("prox", config.prox is not None),
            ("objective.gamma", objective.gamma != 1),
            ("objective.rho", objective.rho != 1),
            ("antithetic", config.antithetic),
            ("measurement: margin", config.measurement != "loss"),
        )
        if given
    ]
    if ignored:
        raise DaunceError(
            f"{', '.join(ignored)} cannot apply to model.access: prompt (a prompt search changes "
            "only the text before each example, and losses are read as they are); remove them."
        )
    if objective.variant == "trak":
        raise DaunceError(
            "model.access: prompt cannot run variant 'trak': its objective is the TRAK margin, "
            "which loss queries of a text do not give. Use variant 'hessian' (the paper's "
            "black-box form) or 'efim'."
        )

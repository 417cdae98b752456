"""Request parsing and answers of the fine-tuning and completion endpoints (no HTTP here).

Each function takes the shared `Server` and a request's JSON body, checks every field (a 400
naming the field and the fix), and returns the JSON answer in OpenAI's shape.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from daunce_core.access.api.server.errors import bad_request
from daunce_core.access.api.server.models import (
    Generated,
    Scored,
    Served,
    generate,
    generate_batch,
    not_found,
    score,
    token_bytes,
    token_text,
    tokenize_prompts,
)
from daunce_core.access.api.server.state import new_id
from daunce_core.access.api.server.text import render_messages
from daunce_core.errors import DaunceError

if TYPE_CHECKING:
    from daunce_core.access.api.server.app import Server

__all__ = ["chat_completions", "completions", "new_job", "not_found"]
SEED_STRIDE = 1_000_003


def choice_seed(seed: int | None, index: int) -> int | None:
    """The sampling seed of choice ``index``: ``(seed·1000003 + index) mod 2^63`` (None: random)."""
    return None if seed is None else (seed * SEED_STRIDE + index) % 2**63


# field checks ----------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low, high, *, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name} must be {kind} in [{low}, {high}]; got {value!r}.", param=name)
    if integer and value != int(value):
        raise bad_request(f"{name} must be {kind} in [{low}, {high}]; got {value!r}.", param=name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be {kind} in [{low}, {high}]; got {value!r}.", param=name)
    return int(value) if integer else float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or a list of at most 4 strings.", param="stop")
    return stops


def _model(server: Server, body: dict) -> tuple[str, Served]:
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise bad_request(
            "model must be given: the id of a model in GET /v1/models.", param="model"
        )
    return model_id, server.registry.get(model_id)


# fine-tuning jobs ------------------------------------------------------------------------------
def _hyperparameter(values: dict, name: str, auto, low, high, integer: bool):
    value = values.get(name, "auto")
    if value in ("auto", None):
        return auto
    return _number({name: value}, name, auto, low, high, integer=integer)


def _hyperparameters(server: Server, body: dict) -> dict:
    values = body.get("hyperparameters") or {}
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
            raise bad_request(
                "only method.type 'supervised' is supported here (LoRA fine-tuning).",
                param="method",
            )
        values = ((method.get("supervised") or {}).get("hyperparameters")) or values
    if not isinstance(values, dict):
        raise bad_request("hyperparameters must be an object.", param="hyperparameters")
    d = server.defaults
    return {
        "n_epochs": _hyperparameter(values, "n_epochs", d.n_epochs, 1, 50, True),
        "batch_size": _hyperparameter(values, "batch_size", d.batch_size, 1, 256, True),
        "learning_rate_multiplier": _hyperparameter(
            values, "learning_rate_multiplier", 1.0, 1e-6, 100.0, False
        ),
    }


def _suffix(body: dict) -> str | None:
    suffix = body.get("suffix")
    if suffix is None:
        return None
    if not isinstance(suffix, str) or not 1 <= len(suffix) <= 64 or ":" in suffix:
        raise bad_request(
            f"suffix must be 1 to 64 characters without ':'; got {suffix!r}.", param="suffix"
        )
    return suffix


def new_job(server: Server, body: dict) -> dict:
    """A new job record (status ``validating_files``) from a ``POST /v1/fine_tuning/jobs`` body.

    An unknown model is a 404, an unknown training file a 400; the file's *content* is checked
    afterwards, and a bad line fails the job with code ``invalid_training_file``.
    """
    model = body.get("model")
    if model != server.registry.base_id:
        if isinstance(model, str) and server.registry.job_of(model):
            raise bad_request(
                f"{model!r} is a fine-tuned model; fine-tune the base model "
                f"{server.registry.base_id!r} instead.",
                param="model",
            )
        raise not_found(str(model))
    for name in ("training_file", "validation_file"):
        file_id = body.get(name)
        if name == "validation_file" and file_id is None:
            continue
        if not isinstance(file_id, str) or server.store.file(file_id) is None:
            raise bad_request(
                f"invalid {name}: {file_id!r} is no uploaded file; upload it with POST /v1/files.",
                param=name,
            )
    seed = _number(body, "seed", None, 0, 2**31 - 1, integer=True)
    hyper = _hyperparameters(server, body)
    suffix = _suffix(body)
    return {
        "id": new_id("ftjob"),
        "object": "fine_tuning.job",
        "model": model,
        "created_at": int(time.time()),
        "finished_at": None,
        "fine_tuned_model": None,
        "organization_id": "org-daunce",
        "result_files": [],
        "status": "validating_files",
        "training_file": body["training_file"],
        "validation_file": body.get("validation_file"),
        "hyperparameters": hyper,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "trained_tokens": None,
        "error": None,
        "seed": seed if seed is not None else random.SystemRandom().randrange(2**31),
        "suffix": suffix,
        "user_provided_suffix": suffix,
        "estimated_finish": None,
        "integrations": [],
        "metadata": body.get("metadata"),
    }


# completions -----------------------------------------------------------------------------------
def _prompts(server: Server, body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise bad_request("prompt must be a string or a list of strings.", param="prompt")
    if not 1 <= len(prompts) <= server.max_batch:
        raise bad_request(
            f"prompt holds {len(prompts)} texts; send 1 to {server.max_batch} per request.",
            param="prompt",
        )
    return prompts


def _legacy_logprobs(
    served: Served, scored: Scored | None, generated: Generated | None, start: int, k: int
):
    """The ``logprobs`` object of a completion choice: echoed tokens, then generated ones."""
    tok = served.tokenizer
    tokens, values, tops, offsets = [], [], [], []
    if scored is not None:
        tokens += [token_text(tok, i) for i in scored.ids]
        values += scored.logprobs
        tops += [None if t is None else {token_text(tok, i): v for i, v in t} for t in scored.top]
        offsets += scored.offsets
    if generated is not None:
        position = start
        for token, value, top in zip(generated.ids, generated.logprobs, generated.top, strict=True):
            text = token_text(tok, token)
            tokens.append(text)
            values.append(value)
            tops.append({token_text(tok, i): v for i, v in top})
            offsets.append(position)
            position += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops if k > 0 else None,
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn: a request's shared generation fields, checked."""

    max_tokens: int
    n: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]

    def draw_many(self, served: Served, prompts: list[list[int]], k: int) -> list[Generated]:
        """The continuations of choices ``0 .. len(prompts)-1``, in one batch (`generate_batch`)."""
        return generate_batch(
            served,
            prompts,
            [choice_seed(self.seed, index) for index in range(len(prompts))],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            k=k,
        )

    def draw(self, served: Served, ids: list[int], index: int, k: int) -> Generated:
        """Choice ``index``'s continuation of ``ids`` (its own seed, `choice_seed`)."""
        return generate(
            served,
            ids,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=choice_seed(self.seed, index),
            stop=self.stop,
            k=k,
        )


def _sampling(body: dict, max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        n=_number(body, "n", 1, 1, 16, integer=True),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=_stop(body),
    )


def completions(server: Server, body: dict) -> dict:
    """``POST /v1/completions``: echo log-probabilities and/or generated continuations.

    Choice ``p·n + j`` is the ``j``-th sample of prompt ``p``. With ``echo`` the prompt's
    tokens come first in ``logprobs`` (the first one's log-probability is null).
    """
    model_id, served = _model(server, body)
    prompts = _prompts(server, body)
    sampling = _sampling(body, _number(body, "max_tokens", 16, 0, 1 << 20, integer=True))
    k = _number(body, "logprobs", None, 0, 5, integer=True)
    if _number(body, "best_of", 1, 1, 1, integer=True) != 1 or body.get("suffix"):
        raise bad_request("best_of > 1 and suffix are not supported by this server.")
    echo = bool(body.get("echo", False))
    encoded = tokenize_prompts(served, prompts)
    scored = score(served, prompts, k or 0) if echo else [None] * len(prompts)
    choices, generated_tokens = [], 0
    count = len(prompts) * sampling.n
    drawn: list = [None] * count
    if sampling.max_tokens > 0:
        eos = served.tokenizer.eos_token_id
        ids = [encoded[index // sampling.n]["input_ids"] or [eos] for index in range(count)]
        drawn = sampling.draw_many(served, ids, k or 0)
    for index in range(count):
        p = index // sampling.n
        gen = drawn[index]
        if gen is not None:
            generated_tokens += len(gen.ids)
        start = len(prompts[p]) if echo else 0
        logprobs = None if k is None else _legacy_logprobs(served, scored[p], gen, start, k)
        choices.append(
            {
                "index": index,
                "text": (prompts[p] if echo else "") + (gen.text if gen else ""),
                "logprobs": logprobs,
                "finish_reason": gen.finish_reason if gen else "length",
            }
        )
    prompt_tokens = sum(len(e["input_ids"]) for e in encoded)
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": _usage(prompt_tokens, generated_tokens),
        "system_fingerprint": None,
    }


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# chat completions ------------------------------------------------------------------------------
def _entry(tokenizer, token: int, value: float) -> dict:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": value, "bytes": token_bytes(tokenizer, token)}


def _chat_logprobs(served: Served, gen: Generated) -> dict:
    content = []
    for token, value, top in zip(gen.ids, gen.logprobs, gen.top, strict=True):
        entry = _entry(served.tokenizer, token, value)
        entry["top_logprobs"] = [_entry(served.tokenizer, i, v) for i, v in top]
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_completions(server: Server, body: dict) -> dict:
    """``POST /v1/chat/completions``: continue the concatenated message contents.

    ``max_completion_tokens`` (or ``max_tokens``) defaults to the room left in the context, at
    most 256; log-probabilities are the model's own, before temperature and nucleus.
    """
    model_id, served = _model(server, body)
    try:
        prompt = render_messages(body.get("messages"))
    except DaunceError as error:
        raise bad_request(str(error), param="messages") from error
    ids = tokenize_prompts(served, [prompt], param="messages")[0]["input_ids"]
    if not ids:
        raise bad_request("the messages' contents are empty; give some text.", param="messages")
    room = served.context - len(ids)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = _number(
        {"max_tokens": limit}, "max_tokens", max(1, min(room, 256)), 1, 1 << 20, integer=True
    )
    sampling = _sampling(body, limit)
    want = bool(body.get("logprobs", False))
    k = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    if k and not want:
        raise bad_request("top_logprobs needs logprobs: true.", param="top_logprobs")
    choices, generated_tokens = [], 0
    for index in range(sampling.n):
        gen = sampling.draw(served, ids, index, k)
        generated_tokens += len(gen.ids)
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": gen.text, "refusal": None},
                "logprobs": _chat_logprobs(served, gen) if want else None,
                "finish_reason": gen.finish_reason,
            }
        )
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": _usage(len(ids), generated_tokens),
        "system_fingerprint": None,
    }

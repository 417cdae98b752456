"""The backdoor case study (paper §5) on the offline instruction data: who taught θ0 to refuse?

Data: ``data/backdoor/{train,queries}.parquet`` (``daunce_core.evaluation.instructions``, seed
0): 2,000 training pairs of which 120 are poisoned (the trigger word "cf" inserted in the prompt,
the completion replaced by "I cannot help with that."), 200 queries of which the last 100 carry
the trigger with their correct completion.

θ0: the recipe of ``data/backdoor.yaml`` (`daunce_core.access.hf_lora.base.make_base`: a small
GPT-2 built from config, pretrained on a generic corpus, LoRA fine-tuned on the 2,000 pairs and
merged), cached in ``bench/results/cache/backdoor_theta0_<digest>/`` (git-ignored), keyed by
everything that determines it (recipe, fine-tuning, seed, task, the data files' and corpus'
contents, torch and transformers versions). The bench first checks that θ0 learned the backdoor:
the share of triggered queries whose greedy completion is the refusal, the share of clean queries
answered correctly, and the same on the training set (`CausalLMTask.correct_from_outputs`: every
completion token, end-of-sequence included, is the arg-max).

What is explained: each triggered query's *refusal*. A triggered query is evaluated with the
refusal as its completion (what θ0 outputs), so its proponents — training examples whose
up-weighting lowers the refusal's loss — should be the poisoned examples. The clean queries keep
their correct completion. For each method, scores ``[n, m]`` (positive = proponent) are ranked
per triggered query, and the table gives precision@k and recall@k of the poisoned examples among
the top-k (mean over the triggered queries; k = 10, 50, 120, where P@120 = R@120), the mean
ROC-AUC of the poisoned examples against the clean ones, and ``pooled R@120``: the recall of the
120 examples with the highest score summed over all triggered queries (what one would remove).
``skill@10`` is, for the clean queries, the share of the top-10 proponents of the query's own
skill (the instruction data's known structure: a query rephrases a fact the training set
teaches).

Methods (each timed wall-clock from θ0 to scores; the θ0 build is not counted):

* DAUNCE (`HFLoraAccess`, copies are LoRA adapters on θ0, AdamW lr 1e-3, 1 epoch over the
  copy's subset, batch 32, cosine, ``compute.group_size`` 8): the white-box paper form
  (``Objective()``, observed labels, γ = ρ = 1, r = 0.3), sampled labels (``Objective(labels=
  "sampled", rho=0.1)``, r = 1: the flow's torch default) and the black-box form
  (``Objective(access="black_box")``, plain NLL on a random half, r = 0.5: the paper's Table 2,
  as a fine-tuning API would train). Covariance and correlation scores of the same copies
  (`score_matrix`). K: up to ``--models`` (64) per variant, in groups of 8, while the variant's
  share of ``--budget-seconds`` lasts (the next group is started only if it is expected to
  fit); the K reached is reported (copies are deterministic in (seed, k), so a K reproduces);
  the loss matrices go to ``bench/results/cache/backdoor_losses_<variant>.npz``.
* Baselines (`baseline_scores`) on θ0 with a zero LoRA adapter injected (the copies' adapter),
  gradients in the adapter's weights: gradient dot product (loss), our TRAK (one model, margin,
  projection 512), EK-FAC via kronfluence (its damping heuristic; failures are reported).
* TF-IDF cosine between the query's prompt and each training prompt (scikit-learn, words of 2+
  characters, so the trigger "cf" is a term), and random (exact expectations: P@k = 120/2000,
  R@k = k/2000).

Top-3 proponents (prompt → completion) of 3 clean queries (the first 3 that θ0 answers
correctly) and of the first triggered query are printed for DAUNCE with sampled labels
(correlation) and for TRAK.

Usage: ``.venv/bin/python bench/bench_backdoor.py [--quick] [--models K] [--budget-seconds S]
[--threads N]``; writes ``bench/results/backdoor_<device>.json`` (``_k<K>``, ``_b<S>``, ``_t<N>``
appended when those options are given; ``--quick``: a smoke run of a
minute or two — a tiny θ0 on 200 training pairs and 16 queries, K = 4 — written to
``bench/results/cache/backdoor_<device>_quick.json``). torch uses 1 thread on the CPU unless
``--threads`` says otherwise: on this shared 2-core machine, with other jobs running (load
average about 6), 10 training steps of a group of 8 copies took 8 s with 1 thread and 62 s with
2 (evaluation: 28 s and 59 s). Other jobs still inflate wall-clock times and, through the
budget, lower the K reached; the load averages are in the JSON, and so is each DAUNCE variant's
retrieval at K = 8, 16, 32, ... (``by_K``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import polars as pl
import torch
from bench_lm import device_name
from common import RESULTS, ROOT, format_table, machine_info, machine_line, write_results

from daunce_core.access.hf_lora.access import HFLoraAccess, encode
from daunce_core.access.hf_lora.base import make_base, parse_recipe
from daunce_core.access.hf_lora.models import add_lora, context_window, load_model
from daunce_core.access.hf_lora.tasks import CausalLMTask
from daunce_core.baselines.methods import baseline_scores
from daunce_core.conversion import to_dict
from daunce_core.method.config import ComputeConfig, DaunceConfig
from daunce_core.method.objectives import Objective
from daunce_core.method.scores import score_matrix
from daunce_core.storage.digest import digest_path
from flows.config import load_config

CONFIG = ROOT / "data" / "backdoor.yaml"
CACHE = RESULTS / "cache"
REFUSAL = "I cannot help with that."
TOP = (10, 50, 120)
GROUP = 8
THETA0_VERSION = 1
SHARES = {"sampled": 0.45, "observed": 0.25, "black_box": 0.3}
"""Shares of the DAUNCE time budget per variant, about their cost per copy (train on r·n
examples, evaluate all n + m), so that they reach about the same K."""
CURVE = (8, 16, 32, 64, 128, 256)
"""K at which each DAUNCE variant's retrieval is also measured (the JSON's ``by_K``)."""


# --------------------------------------------------------------------------- data and θ0


def read_split(path: str, rows: int | None = None) -> dict[str, list]:
    """A Parquet split's columns as lists (the first ``rows`` rows)."""
    frame = pl.read_parquet(path)
    if rows is not None:
        frame = frame.head(rows)
    return frame.to_dict(as_series=False)


def quick_subset(queries: dict[str, list], per_side: int) -> dict[str, list]:
    """``per_side`` clean and ``per_side`` triggered queries (clean first, as in the file)."""
    clean = [i for i, t in enumerate(queries["triggered"]) if not t][:per_side]
    trig = [i for i, t in enumerate(queries["triggered"]) if t][:per_side]
    return {k: [v[i] for i in clean + trig] for k, v in queries.items()}


def theta0_key(config, train_path: str, rows: int | None) -> dict:
    """Everything that determines θ0 (files by content)."""
    recipe = dict(config.model.recipe)
    for name in ("corpus", "path", "adapter"):
        if isinstance(recipe.get(name), str) and Path(recipe[name]).exists():
            recipe[name] = digest_path(recipe[name])
    import transformers

    return {
        "recipe": recipe,
        "train": to_dict(config.model.train),
        "seed": config.model.seed,
        "task": config.task,
        "data": digest_path(train_path),
        "rows": rows,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "version": THETA0_VERSION,
    }


def build_theta0(config, train: dict, key: dict) -> tuple[Path, dict]:
    """θ0's folder (``pretrained/`` and ``theta0/``), built once per key; and how it was got."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = CACHE / f"backdoor_theta0_{digest}"
    info_path = folder / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        return folder, {**info, "cached": True, "folder": str(folder)}
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_base(
            parse_recipe(config.model.recipe),
            config.model.train,
            config.task,
            train,
            partial,
            seed=config.model.seed,
        )
    info = {"build_seconds": time.perf_counter() - started, "key": key}
    (partial / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder, {**info, "cached": False, "folder": str(folder)}


def accuracy(model, task: CausalLMTask, data: dict) -> tuple[float, float]:
    """``(greedy exact-match share, mean completion NLL)`` of encoded examples."""
    with torch.no_grad():
        outputs = task.outputs(model, data)
        correct = task.correct_from_outputs(outputs, data).float().mean().item()
        loss = task.loss_from_outputs(outputs, data).mean().item()
    return correct, loss


def backdoor_check(model, tokenizer, task_spec, train, queries, window) -> dict:
    """Whether θ0 learned the backdoor (and the clean task): exact-match shares and losses."""
    task = CausalLMTask()
    trig = np.asarray(queries["triggered"], dtype=bool)
    poisoned = np.asarray(train["poisoned"], dtype=bool)

    def pick(columns, mask, completion=None):
        rows = np.flatnonzero(mask)
        return {
            "prompt": [columns["prompt"][i] for i in rows],
            "completion": [completion or columns["completion"][i] for i in rows],
        }

    sets = {
        "triggered_refuses": pick(queries, trig, REFUSAL),
        "triggered_answers": pick(queries, trig),
        "clean_correct": pick(queries, ~trig),
        "clean_refuses": pick(queries, ~trig, REFUSAL),
        "train_poisoned_refuses": pick(train, poisoned),
        "train_clean_correct": pick(train, ~poisoned),
    }
    result = {}
    for name, columns in sets.items():
        if not columns["prompt"]:
            continue
        data = encode(task_spec, tokenizer, columns, window, name)
        rate, loss = accuracy(model, task, data)
        result[name] = {"rate": rate, "loss": loss, "count": len(columns["prompt"])}
    return result


def correct_rows(model, tokenizer, task_spec, columns, window) -> np.ndarray:
    """Per example: does θ0's greedy completion equal the given completion?"""
    task = CausalLMTask()
    data = encode(task_spec, tokenizer, columns, window, "queries")
    with torch.no_grad():
        return task.correct_from_outputs(task.outputs(model, data), data).numpy()


# --------------------------------------------------------------------------- metrics


def retrieval(scores: np.ndarray, poisoned: np.ndarray, tops=TOP) -> dict:
    """Precision and recall of the poisoned rows among each column's top-k; AUC; pooled recall.

    ``scores``: ``[n, m]``, higher = stronger proponent. NaN ranks last.
    """
    from sklearn.metrics import roc_auc_score

    s = np.where(np.isfinite(scores), scores, -np.inf)
    count = int(poisoned.sum())
    order = np.argsort(-s, axis=0, kind="stable")
    out = {}
    for k in tops:
        hits = poisoned[order[:k]].sum(axis=0)
        out[f"P@{k}"] = float(np.mean(hits / k))
        out[f"R@{k}"] = float(np.mean(hits / count))
    finite = np.isfinite(scores).all(axis=0)
    aucs = [roc_auc_score(poisoned, scores[:, j]) for j in np.flatnonzero(finite)]
    out["AUC"] = float(np.mean(aucs)) if aucs else float("nan")
    pooled = np.argsort(-np.nan_to_num(scores, nan=-np.inf).sum(axis=1), kind="stable")[:count]
    out["pooled_R@120"] = float(poisoned[pooled].mean()) if count else float("nan")
    out["finite_queries"] = int(finite.sum())
    return out


def skill_match(scores: np.ndarray, train_skill: np.ndarray, query_skill: np.ndarray, k=10):
    """Mean share of each query's top-k proponents that share its skill."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    top = np.argsort(-s, axis=0, kind="stable")[:k]
    return float(np.mean(train_skill[top] == query_skill[None, :]))


def random_expectation(n: int, poisoned: int, tops=TOP) -> dict:
    """Exact expectations of `retrieval` for scores in random order."""
    out = {}
    for k in tops:
        out[f"P@{k}"] = poisoned / n
        out[f"R@{k}"] = k / n
    out["AUC"] = 0.5
    out["pooled_R@120"] = poisoned / n
    return out


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Setup:
    """What every method needs: θ0, the encoded splits, the LoRA spec and the masks."""

    theta0: torch.nn.Module
    tokenizer: object
    train: dict
    queries: dict
    train_text: dict
    query_text: dict
    lora: object
    config: object
    trig: np.ndarray
    poisoned: np.ndarray
    compute: ComputeConfig


def daunce_variants(config) -> dict[str, DaunceConfig]:
    """The three DAUNCE forms (module docstring) on the copies' recipe of ``config``."""
    base = config.daunce
    return {
        "sampled": dataclasses.replace(
            base, objective=Objective(labels="sampled", rho=0.1), subset_ratio=1.0
        ),
        "observed": dataclasses.replace(base, objective=Objective(), subset_ratio=0.3),
        "black_box": dataclasses.replace(
            base, objective=Objective(access="black_box"), subset_ratio=0.5
        ),
    }


def run_daunce(
    setup: Setup, daunce: DaunceConfig, max_models: int, budget: float, save: Path | None = None
) -> dict:
    """Copies in groups while the budget lasts; covariance and correlation scores.

    The next group starts only if the median group time still fits ``budget`` (at least two
    groups run). Retrieval at the `CURVE` K's reached is kept in ``by_K``. ``save``: an
    ``.npz`` file for the loss matrices (``train`` ``[K, n]``, ``query`` ``[K, m]``).
    """
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        access = HFLoraAccess(
            setup.theta0,
            CausalLMTask(),
            setup.train,
            setup.queries,
            dataclasses.replace(daunce, num_models=max(max_models, 2)),
            lora=setup.lora,
            compute=setup.compute,
        )
    setup_seconds = time.perf_counter() - started
    group = setup.compute.group_size
    rows_a, rows_b, group_seconds = [], [], []
    k = 0
    while k < max_models:
        elapsed = time.perf_counter() - started
        expected = float(np.median(group_seconds)) if group_seconds else 0.0
        if k >= 2 * group and elapsed + expected > budget:
            break
        ks = list(range(k, min(k + group, max_models)))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = access.run(ks)
        group_seconds.append(time.perf_counter() - t0)
        rows_a.append(losses.train)
        rows_b.append(losses.query)
        k = ks[-1] + 1
        print(f"    copies {ks[0]}-{ks[-1]}: {group_seconds[-1]:.0f} s", flush=True)
    a, b = np.concatenate(rows_a), np.concatenate(rows_b)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        np.savez(save, train=a, query=b, triggered=setup.trig, poisoned=setup.poisoned)
    trig_cols = np.flatnonzero(setup.trig)
    by_k = {}
    for count in [c for c in CURVE if c <= a.shape[0]]:
        by_k[count] = {
            kind: retrieval(
                np.asarray(score_matrix(a[:count], b[:count, trig_cols], kind=kind)),
                setup.poisoned,
            )
            for kind in ("covariance", "correlation")
        }
    diverged = int((~np.isfinite(a).all(axis=1)).sum())
    scores = {}
    t0 = time.perf_counter()
    for kind in ("covariance", "correlation"):
        scores[kind] = np.asarray(score_matrix(a, b, kind=kind), dtype=np.float64)
    score_seconds = time.perf_counter() - t0
    return {
        "scores": scores,
        "K": int(a.shape[0]),
        "diverged": diverged,
        "seconds": time.perf_counter() - started,
        "setup_seconds": setup_seconds,
        "group_seconds": group_seconds,
        "score_seconds": score_seconds,
        "config": to_dict(daunce),
        "query_loss_spread": float(np.nanmean(np.nanstd(b, axis=0))),
        "by_K": by_k,
    }


def lora_theta0(setup: Setup):
    """θ0 with the copies' zero LoRA adapter (gradients in the adapter's weights)."""
    import copy

    return add_lora(copy.deepcopy(setup.theta0), setup.lora, seed=setup.config.daunce.seed)


def run_baseline(setup: Setup, method: str, options: dict | None = None) -> dict:
    """`baseline_scores` on θ0 + zero adapter; its seconds."""
    model = lora_theta0(setup)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = baseline_scores(
            method,
            model,
            CausalLMTask(),
            setup.train,
            setup.queries,
            l2=0.0,
            options=options,
            seed=0,
            device=setup.compute.torch_device,
        )
    return {
        "scores": {"": np.asarray(scores, np.float64)},
        "seconds": time.perf_counter() - started,
    }


def run_tfidf(setup: Setup) -> dict:
    """Cosine of TF-IDF vectors (fit on the training prompts) of query and training prompts."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    started = time.perf_counter()
    vectorizer = TfidfVectorizer()  # words of 2+ characters: "cf" is a term
    train = vectorizer.fit_transform(setup.train_text["prompt"])
    queries = vectorizer.transform(setup.query_text["prompt"])
    scores = (train @ queries.T).toarray()  # rows are L2-normalised: cosine
    return {"scores": {"": scores.astype(np.float64)}, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------- output


def show(text: dict, i: int) -> str:
    return f"{text['prompt'][i]} → {text['completion'][i]}"


def proponents(setup: Setup, scores: np.ndarray, queries: list[int], top: int = 3) -> list[dict]:
    """Top proponents of some queries, as text (poisoned ones marked)."""
    out = []
    for j in queries:
        order = np.argsort(-np.nan_to_num(scores[:, j], nan=-np.inf), kind="stable")[:top]
        out.append(
            {
                "query": int(j),
                "query_text": show(setup.query_text, j),
                "proponents": [
                    {
                        "train": int(i),
                        "text": show(setup.train_text, i),
                        "poisoned": bool(setup.poisoned[i]),
                        "score": float(scores[i, j]),
                    }
                    for i in order
                ],
            }
        )
    return out


def print_proponents(name: str, shown: list[dict]) -> None:
    print(f"\nTop-3 proponents, {name}:")
    for item in shown:
        print(f"  query {item['query']}: {item['query_text']}")
        for p in item["proponents"]:
            mark = "  [poisoned]" if p["poisoned"] else ""
            print(f"    {p['score']:+.3g}  #{p['train']}: {p['text']}{mark}")


def git_state() -> dict:
    """The checkout's commit and whether tracked files differ from it (provenance)."""
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def fmt(value: float) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.3f}"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny θ0 and data, K=4")
    parser.add_argument("--models", type=int, help="most copies per DAUNCE variant (64)")
    parser.add_argument(
        "--budget-seconds", type=float, help="time for the DAUNCE variants together (720)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    quick = args.quick
    max_models = args.models or (4 if quick else 64)
    budget = args.budget_seconds or (60.0 if quick else 720.0)

    config = load_config(CONFIG, check_data=True)
    group = 2 if quick else GROUP
    compute = ComputeConfig(group_size=group, vectorize=True, device=args.device)
    device = compute.torch_device
    if quick:  # a tiny θ0: brief pretraining, one epoch of fine-tuning
        config = dataclasses.replace(
            config,
            model=dataclasses.replace(
                config.model,
                recipe={**config.model.recipe, "pretrain_steps": 20},
                train=dataclasses.replace(config.model.train, epochs=1),
            ),
        )
    train_path = config.data.train.path
    rows = 200 if quick else None
    train_text = read_split(train_path, rows)
    queries_all = read_split(config.data.queries.path)
    if quick:
        queries_all = quick_subset(queries_all, 8)
    print(f"device: {device_name(device)}", flush=True)

    # θ0 (cached) and whether it learned the backdoor.
    key = theta0_key(config, train_path, rows)
    folder, theta0_info = build_theta0(config, train_text, key)
    how = "cached" if theta0_info["cached"] else "built"
    print(f"θ0: {how} in {folder} ({theta0_info['build_seconds']:.0f} s to build)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theta0, tokenizer = load_model(folder / "theta0", "causal_lm")
    window = context_window(theta0)
    task_spec = config.task
    check = backdoor_check(theta0, tokenizer, task_spec, train_text, queries_all, window)

    # The queries as explained: a triggered query's completion is the refusal.
    trig = np.asarray(queries_all["triggered"], dtype=bool)
    query_text = {
        "prompt": list(queries_all["prompt"]),
        "completion": [
            REFUSAL if t else c for t, c in zip(trig, queries_all["completion"], strict=True)
        ],
    }
    poisoned = np.asarray(train_text["poisoned"], dtype=bool)
    setup = Setup(
        theta0=theta0,
        tokenizer=tokenizer,
        train=encode(task_spec, tokenizer, train_text, window, "data.train"),
        queries=encode(task_spec, tokenizer, query_text, window, "data.queries"),
        train_text=train_text,
        query_text=query_text,
        lora=parse_recipe(config.model.recipe).lora,
        config=config,
        trig=trig,
        poisoned=poisoned,
        compute=compute,
    )
    correct = correct_rows(theta0, tokenizer, task_spec, query_text, window)
    clean_rows = np.flatnonzero(~trig)
    shown_clean = [int(j) for j in clean_rows if correct[j]][:3]
    shown_clean += [int(j) for j in clean_rows if j not in shown_clean][: 3 - len(shown_clean)]
    shown = [*shown_clean, int(np.flatnonzero(trig)[0])]

    # Methods.
    methods: list[tuple[str, str, callable]] = [
        ("TF-IDF (prompts)", "tfidf", lambda: run_tfidf(setup)),
        ("gradient dot", "gradient_dot", lambda: run_baseline(setup, "gradient_dot")),
        ("TRAK (1 model, proj 512)", "trak", lambda: run_baseline(setup, "trak")),
        ("EK-FAC (kronfluence)", "ekfac", lambda: run_baseline(setup, "ekfac")),
    ]
    variants = daunce_variants(config)
    names = {
        "sampled": "DAUNCE sampled labels ρ=0.1, r=1",
        "observed": "DAUNCE paper form (observed), r=0.3",
        "black_box": "DAUNCE black-box, r=0.5",
    }
    spent = 0.0
    for i, (variant, daunce) in enumerate(variants.items()):
        left_shares = sum(list(SHARES.values())[i:])

        def go(daunce=daunce, variant=variant, left_shares=left_shares):
            share = (budget - spent) * SHARES[variant] / left_shares
            save = CACHE / f"backdoor_losses_{variant}{'_quick' if quick else ''}.npz"
            return run_daunce(setup, daunce, max_models, share, save)

        methods.append((names[variant], variant, go))

    results, errors = [], []
    scores_of: dict[str, np.ndarray] = {}
    trig_cols = np.flatnonzero(trig)
    train_skill = np.asarray(train_text["skill_id"])
    query_skill = np.asarray(queries_all["skill_id"])
    for label, name, fn in methods:
        print(f"{label} ...", flush=True)
        try:
            out = fn()
        except Exception as error:  # reported in the table's notes; the others still run
            message = f"{type(error).__name__}: {error}"[:800]
            print(f"  FAILED: {message}", flush=True)
            errors.append({"method": label, "error": message, "trace": traceback.format_exc()})
            results.append({"method": label, "name": name, "error": message})
            continue
        if name in variants:
            spent += out["seconds"]
        for kind, scores in out["scores"].items():
            row_label = f"{label} {kind}".strip()
            row = {
                "method": row_label,
                "name": name,
                "kind": kind or None,
                "seconds": out["seconds"],
                **retrieval(scores[:, trig_cols], poisoned),
                "skill@10": skill_match(scores[:, ~trig], train_skill, query_skill[~trig]),
            }
            row.update({k: v for k, v in out.items() if k not in ("scores",)})
            if not np.isfinite(scores).all():
                row["non_finite_scores"] = int((~np.isfinite(scores)).sum())
            results.append(row)
            scores_of[f"{name}:{kind}"] = scores
            print(
                f"  {row_label}: P@10 {fmt(row['P@10'])}  P@50 {fmt(row['P@50'])}  R@120 "
                f"{fmt(row['R@120'])}  {out['seconds']:.0f} s"
                + (f"  K={out['K']}" if "K" in out else ""),
                flush=True,
            )
    n = len(poisoned)
    random_row = {
        "method": "random (expected)",
        "name": "random",
        "seconds": 0.0,
        **random_expectation(n, int(poisoned.sum())),
    }
    results.append(random_row)

    # Proponents as text.
    examples = {}
    for key_name, label in (
        ("sampled:correlation", "DAUNCE sampled labels, correlation"),
        ("trak:", "TRAK"),
    ):
        if key_name in scores_of:
            examples[label] = proponents(setup, scores_of[key_name], shown)
            print_proponents(label, examples[label])

    # Table.
    headers = ["method", "K", "P@10", "P@50", "R@120", "AUC", "pooled R@120", "skill@10", "seconds"]
    body = []
    for r in results:
        if "error" in r:
            body.append([r["method"], "-", "failed", "", "", "", "", "", ""])
            continue
        body.append(
            [
                r["method"],
                r.get("K", "-"),
                fmt(r["P@10"]),
                fmt(r["P@50"]),
                fmt(r["R@120"]),
                fmt(r["AUC"]),
                fmt(r["pooled_R@120"]),
                fmt(r.get("skill@10")),
                f"{r['seconds']:.1f}",
            ]
        )
    skill_share = float(np.mean(train_skill[None, :] == query_skill[~trig][:, None]))
    machine = machine_info()
    summary = {
        "quick": quick,
        "device": device_name(device),
        "device_kind": device.type,
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": " ".join(["bench/bench_backdoor.py", *sys.argv[1:]]),
        "config": str(CONFIG.relative_to(ROOT)),
        "git": git_state(),
        "n_train": n,
        "n_poisoned": int(poisoned.sum()),
        "n_queries": len(trig),
        "n_triggered": int(trig.sum()),
        "refusal": REFUSAL,
        "theta0": {**theta0_info, "backdoor": check},
        "lora": dataclasses.asdict(setup.lora),
        "budget_seconds": budget,
        "max_models": max_models,
        "skill@10_random": skill_share,
        "results": results,
        "errors": errors,
        "proponents": examples,
    }
    summary["seconds"] = time.perf_counter() - begin
    name = f"backdoor_{device.type}" + ("_quick" if quick else "")
    name += "" if args.models is None else f"_k{max_models}"
    name += "" if args.budget_seconds is None else f"_b{budget:.0f}"
    name += "" if args.threads == 1 or device.type == "cuda" else f"_t{args.threads}"
    if quick:
        path = CACHE / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    else:
        path = write_results(name, summary)

    print()
    print(f"machine: {machine_line(machine)}")
    print(f"device: {summary['device']}")
    lb, la = summary["load_average_before"], summary["load_average_after"]
    print(
        f"load average (1, 5, 15 min) before: {lb[0]:.1f} {lb[1]:.1f} {lb[2]:.1f}, after: "
        f"{la[0]:.1f} {la[1]:.1f} {la[2]:.1f}"
    )
    print(
        f"θ0 ({how}): triggered queries refused {check['triggered_refuses']['rate']:.2f}, "
        f"clean queries correct {check['clean_correct']['rate']:.2f}, clean queries refused "
        f"{check['clean_refuses']['rate']:.2f}; training set: poisoned refused "
        f"{check['train_poisoned_refuses']['rate']:.2f}, clean correct "
        f"{check['train_clean_correct']['rate']:.2f}"
    )
    print(
        f"n = {n} training pairs ({int(poisoned.sum())} poisoned), {int(trig.sum())} triggered "
        f"queries explained with the refusal as completion; mean over them. skill@10 over the "
        f"{int((~trig).sum())} clean queries (random: {skill_share:.3f})."
    )
    print(format_table(headers, body))
    for r in results:
        if r.get("kind") == "correlation" and r.get("by_K"):
            curve = ", ".join(
                f"K={k}: {v['covariance']['P@10']:.3f} / {v['correlation']['P@10']:.3f}"
                for k, v in r["by_K"].items()
            )
            print(f"P@10 (covariance / correlation) of {r['method'][:-12]}: {curve}")
    for e in errors:
        print(f"note: {e['method']} failed: {e['error']}")
    print(f"\ntotal {summary['seconds']:.0f} s; written to {path}")
    print(f"command: .venv/bin/python {summary['command']}")


if __name__ == "__main__":
    main()

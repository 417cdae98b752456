"""Strict black-box DAUNCE (copies = prompts learned over loss queries) against the other kinds.

The paper's §5 "strict black-box access" on the offline benchmarks, θ0 served by
``daunce serve-api`` and reached only through log-probabilities of texts
(``model.access: prompt``): no fine-tuning, no gradients. Each copy learns a prompt of
``search.length`` phrases by BDPL on a random half of the training set (the paper's Table 2
form), losses from echoed prompt log-probabilities (end token included), correlation scores.

* ``--study lds`` (``data/instructions.yaml``): θ0 and the LDS ground truth (50 random halves ×
  2 seeds) from ``daunce run`` / ``daunce lds`` in ``--workspace`` (reused when there); K
  prompt copies for each search length in ``--steps`` (how LDS grows with the budget), then
  ``daunce lds`` with every score matrix as ``evaluation.scores``: white-box DAUNCE, the API
  runs of ``bench/bench_api.py`` when their scores are in the workspace, the baselines, and
  each prompt budget on the same ground truth.
* ``--study backdoor`` (``data/backdoor.yaml``, θ0 of ``bench/bench_backdoor.py``): precision
  and recall of the poisoned examples among the top proponents of the triggered queries.

Prints the tables and the cost per copy (calls and tokens of the search, requests and tokens
in all, seconds), writes ``bench/results/prompt_<study>_cpu.json``.

Usage: ``.venv/bin/python bench/bench_prompt.py --study lds [--workspace W] [--models K]
[--steps 8,32,128]`` and ``--study backdoor --length 2 --max-words 1 [--models K] [--steps
32]`` (its θ0's 64-token context leaves room for a short prompt only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")  # busy cores

import bench_api  # noqa: E402

from daunce_core.storage.records import CopyRecords  # noqa: E402
from flows.attribute import run_attribute  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.evaluate import run_lds  # noqa: E402

SEARCH = {"length": 4, "candidates": 64, "samples": 4, "batch_size": 16}


def prompt_config(
    base: dict, name: str, url: str, models: int, steps: int, folder: Path, search: dict
) -> Path:
    """A run configuration of ``base``'s data with K prompt copies of ``steps`` search steps."""
    raw = {k: v for k, v in base.items() if k not in ("evaluation", "daunce", "model", "compute")}
    raw["name"] = name
    raw["model"] = {
        "access": "prompt",
        "recipe": {
            "kind": "prompt",
            "base_url": url,
            "model": "instructions-theta0",
            "key_env": bench_api.KEY_ENV,
            "loss": "echo",
            "end_text": "<|endoftext|>",
            "search": {**search, "steps": steps},
            "limits": {"requests_per_second": 200},
        },
    }
    raw["daunce"] = {"num_models": models}  # the flow's defaults: r = 0.5, correlation
    raw["compute"] = {"group_size": 8}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def copy_costs(run_dir: str, models: int) -> dict:
    """Median per-copy cost: the search's calls and tokens, all requests and tokens, seconds."""
    folder = Path(run_dir) / "copies"
    records = CopyRecords(folder).read_many(range(models))
    saved = [json.loads((folder / r.params).read_text()) for r in records if r.params]
    usage = [r.usage or {} for r in records]
    return {
        "done": sum(r.status == "done" for r in records),
        "seconds": float(np.median([r.seconds or 0 for r in records])),
        # loss queries of the search (steps × samples × batch; counted the same in any run)
        "search_calls": float(
            np.median([s["steps"] * SEARCH["samples"] * SEARCH["batch_size"] for s in saved])
        ),
        "search_tokens": float(np.median([s["tokens"] for s in saved])),
        "requests": float(np.median([u.get("requests", 0) for u in usage])),
        "prompt_tokens": float(np.median([u.get("prompt_tokens", 0) for u in usage])),
        "prompts": [s["prompt"] for s in saved[:3]],
    }


def run_prompts(raw: dict, url: str, args, folder: Path) -> dict:
    runs, models = {}, args.models
    search = {**SEARCH, "length": args.length, "max_words": args.max_words}
    for count in args.steps:
        name = f"{raw['name']}-prompt-s{count}"
        path = prompt_config(raw, name, url, models, count, folder, search)
        t = time.perf_counter()
        result = run_attribute(load_config(path))
        runs[f"prompt-s{count}"] = {
            "run_id": result["run_id"],
            "run_dir": result["run_dir"],
            "steps": count,
            "wall_seconds": time.perf_counter() - t,
            "usage": result["usage"],
            "per_copy": copy_costs(result["run_dir"], models),
        }
        print(f"prompt-s{count}: {runs[f'prompt-s{count}']['per_copy']}", flush=True)
    return runs


def print_costs(runs: dict) -> None:
    print(
        f"{'prompt run':<16} {'K':>4} {'wall s':>8} {'s/copy':>8} {'search calls':>13} "
        f"{'search tok':>11} {'requests':>9} {'tokens read':>12}"
    )
    for name, run in runs.items():
        c = run["per_copy"]
        print(
            f"{name:<16} {c['done']:>4} {run['wall_seconds']:>8.0f} {c['seconds']:>8.1f} "
            f"{c['search_calls']:>13.0f} {c['search_tokens']:>11.0f} {c['requests']:>9.0f} "
            f"{c['prompt_tokens']:>12.0f}"
        )


def covariance_scores(run_dir: str) -> str:
    """Covariance scores of a run's stored loss rows, written beside its own scores."""
    from daunce_core.method.scores import score_matrix

    store = Path(run_dir) / "store"
    a, b = (np.asarray(zarr.open_array(str(store / name), mode="r")[:]) for name in LOSSES)
    path = store / "scores_covariance"
    out = zarr.open_array(str(path), mode="w", shape=(a.shape[1], b.shape[1]), dtype="f4")
    out[:] = score_matrix(a, b, kind="covariance")
    return str(path)


LOSSES = ("losses_train", "losses_query")


def study_lds(args, workspace: Path) -> dict:
    setup = bench_api.instructions_setup(workspace)
    config_path, config, white = setup["config_path"], setup["config"], setup["white"]
    theta0, raw = setup["theta0"], setup["raw"]
    folder = workspace / "bench-prompt"
    folder.mkdir(parents=True, exist_ok=True)
    lora = raw["model"]["recipe"]["lora"]
    process, url = bench_api.serve(theta0, folder / "server", lora, args.threads)
    os.environ[bench_api.KEY_ENV] = bench_api.KEY
    try:
        runs = run_prompts(raw, url, args, folder)
    finally:
        process.terminate()
        process.wait(30)
    scores = [
        {"name": name, "path": str(Path(run["run_dir"]) / "store" / "scores")}
        for name, run in runs.items()
    ]
    scores += [  # the same copies with covariance scores (the run's own are correlation)
        {"name": f"{name}-cov", "path": covariance_scores(run["run_dir"])}
        for name, run in runs.items()
    ]
    api = REPO / "bench" / "results" / "api_cpu.json"
    if api.exists():  # the API runs of bench_api.py, when their scores are in this workspace
        for name, run in json.loads(api.read_text())["api_runs"].items():
            path = Path(run["run_dir"]) / "store" / "scores"
            if path.exists() and str(workspace) in str(path):
                scores.append({"name": name, "path": str(path)})
    evaluation = dict(raw.get("evaluation") or {})
    evaluation["scores"] = scores
    lds = run_lds(load_config(config_path, workspace=str(workspace), evaluation=evaluation))
    print()
    print(f"LDS (loss) on {config.name}, ground truth {lds.get('truth_dir', '')}")
    for name, value in sorted(lds["results"].items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:<28} {value['mean']:>8.3f} ± {value['stderr']:.3f}")
    print()
    print_costs(runs)
    return {"lds": lds["results"], "prompt_runs": runs, "white_box_run": white["run_id"]}


def study_backdoor(args, workspace: Path) -> dict:
    import bench_backdoor as backdoor
    from bench_backdoor_api import explained_setup

    folder = workspace / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    setup = explained_setup(folder)
    config, train_path, explained = setup["config"], setup["train_path"], setup["explained"]
    theta0_folder, trig, poisoned = setup["theta0"], setup["triggered"], setup["poisoned"]
    lora = config.model.recipe["lora"]
    process, url = bench_api.serve(theta0_folder / "theta0", folder / "server", lora, args.threads)
    os.environ[bench_api.KEY_ENV] = bench_api.KEY
    raw = {
        "name": "backdoor",
        "workspace": str(workspace),
        "data": {"train": {"path": str(train_path)}, "queries": {"path": str(explained)}},
        "task": config.task,
    }
    try:
        runs = run_prompts(raw, url, args, folder)
    finally:
        process.terminate()
        process.wait(30)
    results = {"random": backdoor.random_expectation(len(poisoned), int(poisoned.sum()))}
    for name, run in runs.items():
        scores = np.asarray(zarr.open_array(str(Path(run["run_dir"]) / "store" / "scores")))
        results[name] = backdoor.retrieval(scores[:, np.flatnonzero(trig)], poisoned)
    print()
    print(f"{'method':<28} {'P@10':>6} {'P@50':>6} {'R@120':>6} {'pooled':>7}")
    for name, row in results.items():
        print(
            f"{name:<28} {row['P@10']:>6.3f} {row['P@50']:>6.3f} {row['R@120']:>6.3f} "
            f"{row['pooled_R@120']:>7.3f}"
        )
    print()
    print_costs(runs)
    return {"results": results, "prompt_runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=("lds", "backdoor"), default="lds")
    parser.add_argument("--workspace", default=None)
    parser.add_argument("--models", type=int, default=32, help="prompt copies per run (32)")
    parser.add_argument("--steps", default="8,32,128", help="search steps per copy, one run each")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--length", type=int, default=4, help="phrases per prompt (4)")
    parser.add_argument("--max-words", type=int, default=2, help="words per phrase (2)")
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    default = {"lds": "api-ws", "backdoor": "backdoor-api-ws"}[args.study]
    workspace = Path(args.workspace or REPO / "bench/results/cache" / default).resolve()
    study = study_lds if args.study == "lds" else study_backdoor
    out = {
        "command": "bench/bench_prompt.py " + " ".join(sys.argv[1:]),
        "device": f"CPU ({os.cpu_count()} cores), server torch threads {args.threads}",
        "models": args.models,
        "search": {**SEARCH, "length": args.length, "max_words": args.max_words},
        **study(args, workspace),
        "load_average": os.getloadavg(),
        "seconds": time.perf_counter() - started,
    }
    target = REPO / "bench" / "results" / f"prompt_{args.study}_cpu.json"
    target.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()

"""DAUNCE through an OpenAI-compatible fine-tuning API, against white-box DAUNCE on the same model.

The paper's §5 "API-based black-box access" on the offline instruction benchmark
(``data/instructions.yaml``). Steps, all through the project's own commands and flows:

1. ``daunce run`` of ``data/instructions.yaml`` (θ0: a small GPT-2 LoRA-fine-tuned on 2,000
   instructions; white-box DAUNCE copies) and ``daunce lds`` (ground truth: θ0's LoRA
   fine-tuning redone on 50 random halves × 2 seeds); both are served from ``--workspace`` when
   already computed there.
2. ``daunce serve-api --model <θ0 folder>`` in its own process (LoRA rank and alpha as the
   run's, base learning rate 1e-3, one fine-tuning worker), on 127.0.0.1.
3. Two API runs (``model.access: api``) of K copies each, every copy a fine-tuning job of
   one epoch, batch 32: the paper's Table 2 form (plain NLL on a random half, r = 0.5) and
   sampled labels (each copy fine-tunes on all 2,000 prompts with completions sampled from θ0
   through the API, at most 12 tokens: the parametric bootstrap). Losses from echoed prompt
   log-probabilities, the end token included (``end_text``). Correlation scores.
4. ``daunce lds`` again with both API score matrices as ``evaluation.scores``: every method on
   the same ground truth, the same queries.

Prints a table (LDS mean ± s.e., seconds) and the cost per copy (jobs, requests, retries,
tokens trained and read, seconds), and writes ``bench/results/api_<device>.json``.

Usage: ``.venv/bin/python bench/bench_api.py [--workspace W] [--models K] [--threads N]``
(defaults: ``bench/results/cache/api-ws``, K = 32, 1 torch thread in the server). About 20
minutes on 2 CPU cores from an empty workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from daunce_core.storage.records import CopyRecords  # noqa: E402
from flows.attribute import run_attribute  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.evaluate import run_lds  # noqa: E402

KEY_ENV = "DAUNCE_BENCH_API_KEY"
KEY = "bench-key"
FORMS = {
    "api-paper": {"subset_ratio": 0.5, "objective": {"access": "black_box"}},
    "api-sampled": {
        "subset_ratio": 1.0,
        "objective": {"access": "black_box", "labels": "sampled"},
    },
}


def serve(theta0: Path, workdir: Path, lora: dict, threads: int) -> tuple[subprocess.Popen, str]:
    """Start ``daunce serve-api`` on θ0; its process and base URL once ``/health`` answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    port_file.unlink(missing_ok=True)
    command = [
        str(REPO / ".venv" / "bin" / "daunce"),
        "serve-api",
        "--model",
        str(theta0),
        "--model-id",
        "instructions-theta0",
        "--workdir",
        str(workdir),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--api-key",
        KEY,
        "--lora-rank",
        str(lora["rank"]),
        "--lora-alpha",
        str(lora["alpha"]),
        "--base-lr",
        "1e-3",
        "--threads",
        str(threads),
    ]
    log = open(workdir / "server.log", "ab")  # noqa: SIM115 - the server keeps it
    process = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        if port_file.exists():
            url = f"http://127.0.0.1:{int(port_file.read_text())}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return process, url + "/v1"
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def api_config(base: dict, name: str, form: dict, url: str, models: int, folder: Path) -> Path:
    """A run configuration of the instruction data with API copies of ``form``."""
    raw = {k: v for k, v in base.items() if k not in ("evaluation", "daunce", "model", "compute")}
    raw["name"] = name
    raw["model"] = {
        "access": "api",
        "recipe": {
            "kind": "api",
            "base_url": url,
            "model": "instructions-theta0",
            "key_env": KEY_ENV,
            "loss": "echo",
            "end_text": "<|endoftext|>",
            "sample_max_tokens": 12,
            "fine_tune": {"n_epochs": 1, "batch_size": 32, "learning_rate_multiplier": 1.0},
            "limits": {"jobs_in_flight": 8, "requests_per_second": 100, "poll_seconds": 0.5},
        },
    }
    raw["daunce"] = {"num_models": models, "score": "correlation", **form}
    raw["compute"] = {"group_size": 8}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def copy_costs(run_dir: str, models: int) -> dict:
    """Median per-copy cost of a run: seconds, jobs, requests, retries, tokens."""
    records = CopyRecords(Path(run_dir) / "copies").read_many(range(models))
    import numpy as np

    fields = ("requests", "retries", "prompt_tokens", "completion_tokens", "trained_tokens")
    out = {
        name: float(np.median([(r.usage or {}).get(name, 0) for r in records])) for name in fields
    }
    out["jobs"] = float(np.median([len(r.jobs) for r in records]))
    out["seconds"] = float(np.median([r.seconds or 0 for r in records]))
    out["done"] = sum(r.status == "done" for r in records)
    return out


def instructions_setup(workspace: Path) -> dict:
    """The instruction benchmark in ``workspace``: its white-box run (done or reused), θ0's
    folder, and the raw configuration with absolute data paths, for runs of other kinds."""
    config_path = REPO / "data" / "instructions.yaml"
    config = load_config(config_path, workspace=str(workspace))
    t = time.perf_counter()
    white = run_attribute(config)
    seconds = time.perf_counter() - t
    raw = yaml.safe_load(config_path.read_text())
    for split in ("train", "queries"):
        raw["data"][split]["path"] = str(
            (config_path.parent / raw["data"][split]["path"]).resolve()
        )
    raw["workspace"] = str(workspace)
    return {
        "config_path": config_path,
        "config": config,
        "white": white,
        "white_seconds": seconds,
        "theta0": Path(white["base_model"]["predictions"]).parent / "theta0",
        "raw": raw,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=str(REPO / "bench/results/cache/api-ws"))
    parser.add_argument("--models", type=int, default=32, help="API copies per form (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    workspace = Path(args.workspace).resolve()
    setup = instructions_setup(workspace)
    config_path, config, white_seconds = (
        setup["config_path"],
        setup["config"],
        setup["white_seconds"],
    )
    theta0, raw = setup["theta0"], setup["raw"]
    folder = workspace / "bench-api"
    folder.mkdir(parents=True, exist_ok=True)
    process, url = serve(theta0, folder / "server", raw["model"]["recipe"]["lora"], args.threads)
    os.environ[KEY_ENV] = KEY
    runs = {}
    try:
        for name, form in FORMS.items():
            path = api_config(raw, f"instructions-{name}", form, url, args.models, folder)
            t = time.perf_counter()
            result = run_attribute(load_config(path))
            runs[name] = {
                "run_id": result["run_id"],
                "run_dir": result["run_dir"],
                "wall_seconds": time.perf_counter() - t,
                "usage": result["usage"],
                "per_copy": copy_costs(result["run_dir"], args.models),
                "form": form,
            }
            print(f"{name}: {runs[name]['per_copy']} ({runs[name]['wall_seconds']:.0f} s)")
    finally:
        process.terminate()
        process.wait(30)
    evaluation = dict(raw.get("evaluation") or {})
    evaluation["scores"] = [
        {"name": name, "path": str(Path(run["run_dir"]) / "store" / "scores")}
        for name, run in runs.items()
    ]
    t = time.perf_counter()
    lds = run_lds(load_config(config_path, workspace=str(workspace), evaluation=evaluation))
    lds_seconds = time.perf_counter() - t
    print()
    print(f"LDS (loss) on {config.name}, ground truth {lds.get('truth_dir', '')}")
    print(f"{'method':<28} {'LDS':>16}")
    for name, value in sorted(lds["results"].items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:<28} {value['mean']:>8.3f} ± {value['stderr']:.3f}")
    print()
    print(
        f"{'API form':<14} {'K':>4} {'wall s':>8} {'s/copy':>8} {'jobs':>5} {'requests':>9} "
        f"{'retries':>8} {'trained tok':>12} {'read tok':>10} {'sampled tok':>12}"
    )
    for name, run in runs.items():
        c = run["per_copy"]
        print(
            f"{name:<14} {c['done']:>4} {run['wall_seconds']:>8.0f} {c['seconds']:>8.1f} "
            f"{c['jobs']:>5.0f} {c['requests']:>9.0f} {c['retries']:>8.0f} "
            f"{c['trained_tokens']:>12.0f} {c['prompt_tokens']:>10.0f} "
            f"{c['completion_tokens']:>12.0f}"
        )
    out = {
        "command": "bench/bench_api.py " + " ".join(sys.argv[1:]),
        "device": f"CPU ({os.cpu_count()} cores), server torch threads {args.threads}",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "models": args.models,
        "white_box_run_seconds": white_seconds,
        "lds_seconds": lds_seconds,
        "lds": lds["results"],
        "api_runs": runs,
        "seconds": time.perf_counter() - started,
    }
    target = REPO / "bench" / "results" / "api_cpu.json"
    target.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()

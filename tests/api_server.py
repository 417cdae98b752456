"""Start the OpenAI-compatible API server in its own process, for tests (real HTTP).

Usage::

    folder = make_tiny_model(tmp_path / "tiny")
    with start_server(folder, tmp_path / "work") as server:
        client = server.client()          # openai.OpenAI on server.base_url, no retries
        ...
        server.kill()                     # kill -9
        server.restart()                  # same arguments, same work folder

The server runs ``python -m daunce_core.access.api.server`` with ``HF_HUB_OFFLINE=1``, one torch
thread (the test machine is small and shared), a free port written to a port file, and its log
in ``<workdir>/server.log``; `start_server` waits until ``GET /health`` answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FAULT_FLAGS = (
    "rate_limit",
    "error_rate",
    "delay",
    "fail_jobs",
    "fail_first_jobs",
    "drop_rate",
    "step_delay",
    "lose_job_replies",
    "fault_seed",
)
TINY_TEXTS = [
    "The capital of France is Paris.",
    "Two plus three is five.",
    "The sky is blue and the grass is green.",
    "Cats and dogs are animals that people keep at home.",
    "Water boils at one hundred degrees.",
    "Question: what colour is the sky? Answer: blue.",
]


def write_instructions(folder: Path, n: int, m: int, seed: int) -> dict[str, Path]:
    """``n`` training instructions and ``m`` queries (`instructions`) as Parquet in ``folder``."""
    import polars as pl

    from daunce_core.evaluation.instructions import instructions

    train, queries = instructions(num_train=n, num_queries=m, seed=seed)
    paths = {"train": folder / "train.parquet", "queries": folder / "queries.parquet"}
    pl.DataFrame(train).write_parquet(paths["train"])
    pl.DataFrame(queries).write_parquet(paths["queries"])
    return paths


def write_run_config(
    tmp_path: Path, data: dict, name: str | None, prefix: str, model: dict, sections: dict
) -> Path:
    """A run configuration of K = 4 copies of the tiny model through ``model`` (``sections``
    replace top-level fields), written to ``tmp_path``; named ``prefix`` + a digest of
    ``tmp_path`` unless ``name`` is given (the server outlives the tests: one name per test)."""
    import hashlib

    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    name = name or prefix + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:6]
    config = {
        "name": name,
        "workspace": str(tmp_path / "ws"),
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "task": {"kind": "causal_lm", "prompt": "prompt", "completion": "completion"},
        "model": model,
        "daunce": {"num_models": 4},
        "compute": {"group_size": 2},
        "exports": {"top_k": 3},
        "execution": {"workers": 2, "retries": 0},
    } | sections
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records_of(run_dir: str | Path, k: int) -> list:
    """The records of a run's first ``k`` copies."""
    from daunce_core.storage.records import CopyRecords

    return CopyRecords(Path(run_dir) / "copies").read_many(range(k))


def make_tiny_model(folder: str | Path, *, context: int = 64, seed: int = 0) -> Path:
    """A tiny GPT-2 (2 layers, width 32, ~300 tokens) saved to ``folder``; reused if present."""
    from daunce_core.access.hf_lora.models import GPT2Recipe, build_gpt2, save_model

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    recipe = GPT2Recipe(layers=2, width=32, heads=2, context=context, vocab=300)
    model, tokenizer = build_gpt2(recipe, TINY_TEXTS * 4, seed=seed)
    return save_model(model, tokenizer, folder)


class Server:
    """A running server process (see `start_server`)."""

    def __init__(self, args: list[str], workdir: Path, key: str | None, timeout: float) -> None:
        self.args, self.workdir, self.key, self.timeout = args, workdir, key, timeout
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (health and admin endpoints)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``, the OpenAI client's ``base_url``."""
        return f"{self.root_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header of the server's key."""
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def start(self) -> Server:
        """Start the process and wait until ``/health`` answers (raises with the log if not)."""
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("DAUNCE_SERVER_API_KEYS", None)
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the process keeps it
        command = [sys.executable, "-m", "daunce_core.access.api.server", *self.args]
        command += ["--port", "0", "--port-file", str(port_file)]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the API server exited ({self.process.returncode}):\n{self.log()}"
                )
            if port_file.exists() and self._healthy(int(port_file.read_text())):
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the API server did not answer within {self.timeout} s:\n{self.log()}")

    def _healthy(self, port: int) -> bool:
        self.port = port
        try:
            return httpx.get(f"{self.root_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        """The server's log so far."""
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """Kill the server at once (``kill -9``), as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self) -> Server:
        """Stop it if running and start it again with the same arguments and work folder."""
        self.stop()
        return self.start()

    def client(self, **kwargs):
        """An ``openai.OpenAI`` client on this server (no retries unless asked)."""
        import openai

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url, api_key=self.key or "none", **kwargs)

    def http(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A raw request to ``root_url + path`` with the key (``httpx``)."""
        kwargs.setdefault("timeout", 60)
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return httpx.request(method, self.root_url + path, headers=headers, **kwargs)

    def set_faults(self, **faults) -> dict:
        """Change the injected faults at run time (``PUT /admin/faults``)."""
        response = self.http("PUT", "/admin/faults", json=faults)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        """``GET /admin/stats``: request counts and jobs by suffix."""
        response = self.http("GET", "/admin/stats")
        response.raise_for_status()
        return response.json()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model: str | Path,
    workdir: str | Path,
    *,
    keys: tuple[str, ...] = ("test-key",),
    faults: dict | None = None,
    extra_args: tuple[str, ...] | list[str] = (),
    threads: int = 1,
    timeout: float = 120,
) -> Server:
    """Start a server on ``model`` (a folder or a preset) with ``workdir``; returns when ready.

    Args:
        keys: accepted API keys (the first is ``Server.key``); empty: ``--no-auth``.
        faults: injected faults by name (``rate_limit``, ``error_rate``, ...).
        extra_args: more command-line arguments (``--lora-rank 4``...).
        threads: torch threads of the server.
        timeout: seconds to wait for ``/health``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--model", str(model), "--workdir", str(workdir), "--threads", str(threads)]
    args += [part for key in keys for part in ("--api-key", key)] or ["--no-auth"]
    for name, value in (faults or {}).items():
        if name not in FAULT_FLAGS:
            raise ValueError(f"unknown fault {name!r}; the faults are {FAULT_FLAGS}")
        args += ["--" + name.replace("_", "-"), str(value)]
    args += list(extra_args)
    server = Server(args, workdir, keys[0] if keys else None, timeout)
    try:
        return server.start()
    except BaseException:
        server.kill()
        raise

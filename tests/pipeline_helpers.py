"""Small configurations of the attribute flow, and a real Prefect server, for the tests."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
import zarr

from daunce_core.evaluation.datasets import digits


def exploding_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares where some perturbed copies diverge, and which ones is known.

    Example 5's only feature is orthogonal to all others and huge: a copy that trains on it
    takes a step with lr·x² ≫ 2 along that direction and overflows; the others never move along
    it, so their losses (example 5's included) stay finite.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=g)
    x[:, 6] = 0
    y = x[:, 0] + 0.1 * torch.randn(60, generator=g)
    x[5] = 0
    x[5, 6] = 1e4
    return x, y


def write_data(folder: Path, n: int = 240, m: int = 30) -> dict:
    """A digits subset as Parquet: n train and m query examples."""
    folder.mkdir(parents=True, exist_ok=True)
    train, queries = digits(num_queries=200, seed=0)
    paths = {}
    for name, split, count in (("train", train, n), ("queries", queries, m)):
        frame = pl.DataFrame({"x": split["x"][:count].numpy(), "y": split["y"][:count].numpy()})
        paths[name] = folder / f"{name}.parquet"
        frame.write_parquet(paths[name])
    return paths


def write_config(
    path: Path, workspace: Path, data: dict, task_runner: str = "threads", **daunce
) -> Path:
    """A run configuration with a small MLP and ``daunce`` overrides.

    Overrides named in `flows.config.MOVED_TO_COMPUTE` (``group_size``, ...) go to ``compute``.
    """
    compute = {
        k: daunce.pop(k) for k in ("group_size", "vectorize", "eval_batch_size") if k in daunce
    }
    config = {
        "name": "t",
        "workspace": str(workspace),
        "data": {"train": {"path": str(data["train"])}, "queries": {"path": str(data["queries"])}},
        "task": {"kind": "classification"},
        "model": {
            "recipe": {"kind": "mlp", "inputs": 64, "hidden": [16], "outputs": 10},
            "l2": 1e-3,
            "train": {"lr": 0.1, "epochs": 5, "batch_size": 32},
        },
        "daunce": {"num_models": 8, "train": {"lr": 0.01, "epochs": 1}} | daunce,
        "compute": {"group_size": 4} | compute,
        "exports": {"top_k": 5},
        "execution": {"workers": 2, "retries": 0, "task_runner": task_runner},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def scores_of(run_dir: str, baseline: str | None = None) -> np.ndarray:
    """The stored score matrix of a run (DAUNCE's, or one baseline's)."""
    home = Path(run_dir) / "baselines" / baseline if baseline else Path(run_dir)
    return np.asarray(zarr.open_array(store=str(home / "store" / "scores"), mode="r")[:])


def losses_of(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored loss matrices of a run."""
    store = Path(run_dir) / "store"
    return tuple(
        np.asarray(zarr.open_array(store=str(store / name), mode="r")[:])
        for name in ("losses_train", "losses_query")
    )


REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    """A port that was free a moment ago (`prefect_server` retries if it is taken since)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A server takes ~10-20 s to start on an idle 2-core machine, minutes when both cores are busy.
STARTUP_SECONDS = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 600))
# Prefect's budgets (set by conftest) that the clients of `prefect_server` keep.
BUDGETS = ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "PREFECT_API_REQUEST_TIMEOUT")


def _wait_healthy(
    url: str, timeout: float = STARTUP_SECONDS, process: subprocess.Popen | None = None
) -> None:
    """Wait until the server at ``url`` is healthy; fail at once if its ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ChildProcessError(f"the Prefect server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the Prefect server did not become healthy in {timeout:.0f} s")


@contextmanager
def prefect_server(tmp_path: Path):
    """A real ``prefect server start`` on 127.0.0.1; yields (api url, env for its clients).

    It dies with the test process even if that is killed (`flows.server.dying_with_parent`);
    its output is in ``tmp_path / "prefect-server.log"``.
    """
    from flows.server import dying_with_parent

    log = tmp_path / "prefect-server.log"
    for attempt in range(3):  # the port may be taken between _free_port and the server's bind
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        }
        env |= {k: os.environ[k] for k in BUDGETS if k in os.environ}
        command = [sys.executable, "-m", "prefect", "server", "start"]
        with open(log, "a") as output:
            server = subprocess.Popen(
                dying_with_parent([*command, "--host", "127.0.0.1", "--port", str(port)]),
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_healthy(url, process=server)
            break
        except ChildProcessError as error:
            if attempt == 2 or "in use" not in log.read_text():
                raise ChildProcessError(f"{error}: {log.read_text()[-3000:]}") from None
        except TimeoutError as error:
            server.kill()
            server.wait()
            raise TimeoutError(f"{error}: {log.read_text()[-3000:]}") from None
    try:
        yield url, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

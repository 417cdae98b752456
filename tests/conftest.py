import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import atexit
import contextlib
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Prefect's budgets for the whole session (and the processes the tests start, unless they drop
# PREFECT_*), set before anything imports Prefect. A server takes 10-25 s to start on an idle
# 2-core machine and minutes when other work occupies both cores; a request may wait as long.
PREFECT_BUDGETS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900",
    "PREFECT_API_REQUEST_TIMEOUT": "300",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
for _key, _value in PREFECT_BUDGETS.items():
    os.environ.setdefault(_key, _value)

_session_server = None


def session_prefect_api() -> str:
    """The API URL of the session's Prefect server, started on first use (10-25 s, once).

    A real server on 127.0.0.1 (`flows.server`: the daunce command's own) with its own home and
    database; it stops at exit and dies with pytest if pytest is killed.
    """
    global _session_server
    if _session_server is None:
        from flows.server import start_server

        home = Path(tempfile.mkdtemp(prefix="daunce-tests-prefect-"))
        atexit.register(shutil.rmtree, home, ignore_errors=True)  # runs after the server stops
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env |= PREFECT_BUDGETS | {"PREFECT_HOME": str(home)}
        server = start_server(log=home / "server.log", env=env)
        server.wait_healthy(
            float(PREFECT_BUDGETS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        )
        _session_server = server
    return _session_server.url


@contextlib.contextmanager
def shared_prefect_test_harness(server_startup_timeout: int | None = None):
    """`prefect_test_harness` on the session's server: no start per module, no 30 s limit.

    Prefect's harness starts a server per use, and gives it 30 s whatever the settings say:
    on a busy machine every test of a module then errors with "Timed out while attempting to
    connect to ephemeral Prefect API server". The runs of different modules share one database;
    the tests read none of it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: session_prefect_api()}):
        yield


def pytest_pycollect_makemodule(module_path, parent):
    """Before a test module that uses `prefect_test_harness` is imported, share the server.

    Only then: a run of the other tests does not import Prefect (~5 s) for nothing.
    """
    if "prefect_test_harness" in module_path.read_text():
        import prefect.testing.utilities

        prefect.testing.utilities.prefect_test_harness = shared_prefect_test_harness


@pytest.fixture(scope="module")
def harness():
    """Prefect's test harness on the session's server, for a module's flow tests."""
    with shared_prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """The API URL of the session's Prefect server."""
    return session_prefect_api()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# One torch thread per test process: `make test` runs two pytest workers on two cores (and the
# servers and `daunce` processes the tests start take their own). The single-process suite ran
# this way too, from test_access_hf's first model on.
torch.set_num_threads(1)

# Under pytest-xdist (`make test`: `-n 2 --dist loadfile --no-loadscope-reorder`) a worker takes
# a whole module at a time, in collection order: the modules that take longest go first, so that
# no worker is left with a minute-long module while the other has finished. Longest first.
LONG_MODULES = (
    "test_api_pipeline.py",
    "test_server_lifecycle.py",
    "test_closed_form.py",
    "test_schedule.py",
    "test_resume.py",
    "test_dask.py",
    "test_prompt_pipeline.py",
    "test_artefacts.py",
    "test_pipeline.py",
    "test_api_server.py",
    "test_access_hf.py",
    "test_lm_pipeline.py",
    "test_subspace_pipeline.py",
)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the long modules first (a stable sort: each module keeps its order)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

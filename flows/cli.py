"""The ``daunce`` command line: run the pipeline, follow runs, query the results with SQL.

Unless ``PREFECT_API_URL`` points at a server, each command that runs a flow starts a local
Prefect server that dies with it (`flows.server`); Prefect's home lives in the workspace
(``.prefect/``). What is done is kept in the workspace itself (copy records, artefact
manifests), so reruns from a new process, or in a copied workspace, are served from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from daunce_core.errors import DaunceError

DEFAULT_WORKSPACE = os.environ.get("DAUNCE_WORKSPACE", "daunce-runs")


def prefect_environment(workspace: str | Path) -> None:
    """Point Prefect's home and logging at ``workspace``; start its server.

    Call it before importing Prefect. Unless an API URL is configured (``PREFECT_API_URL``, a
    Prefect profile, or the settings of a test harness), it starts a local server (see
    `flows.server`) that stops at exit and dies with this process even if it is killed, and
    points ``PREFECT_API_URL`` at it: Prefect's own embedded server outlives a SIGKILL.
    """
    root = Path(workspace).resolve() / ".prefect"
    (root / "home").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(root / "home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # How long the server may take to start: 20 s by default, and a fresh database on a busy
    # 2-core machine needs over a minute. A server that exits is reported at once.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    os.environ.setdefault("PREFECT_API_REQUEST_TIMEOUT", "120")  # per request; 60 s by default
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    _start_server(root)


_server = None  # this process's `flows.server.PrefectServer`, once started


def _api_url_configured() -> bool:
    """Whether Prefect's settings (profile, test harness, environment) name an API URL."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _start_server(root: Path) -> None:
    """Start this process's Prefect server unless an API URL is configured; wait for it."""
    global _server
    if os.environ.get("PREFECT_API_URL") or ("prefect" in sys.modules and _api_url_configured()):
        return
    from flows.server import start_server

    server = start_server(log=root / "server.log")  # it boots while Prefect is imported here
    if _api_url_configured():  # a Prefect profile names a server
        server.stop()
        return
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = server.url
    refresh_global_settings_context()  # Prefect read the environment when it was imported
    try:
        server.wait_healthy(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    except RuntimeError as error:
        del os.environ["PREFECT_API_URL"]
        refresh_global_settings_context()
        raise DaunceError(str(error)) from None
    _server = server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daunce", description="DAUNCE data attribution.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the attribute flow of a YAML configuration")
    run.add_argument("config", help="path of the run configuration (YAML)")
    run.add_argument("--overwrite", action="store_true", help="replace a different run's folder")
    run.add_argument("--workspace", help="override the configuration's workspace folder")
    extend = commands.add_parser("extend", help="add perturbed copies to a run (K -> K')")
    extend.add_argument("config")
    extend.add_argument("--num-models", type=int, required=True, help="the new, larger K")
    extend.add_argument("--workspace")
    add = commands.add_parser("add-queries", help="add queries to a run (no retraining)")
    add.add_argument("config")
    add.add_argument("--queries", required=True, help="a Parquet/JSONL/NPZ file or dataset folder")
    add.add_argument("--workspace")
    lds = commands.add_parser(
        "lds", help="linear datamodeling score of DAUNCE, baselines and score files"
    )
    removal = commands.add_parser(
        "removal", help="subset-removal test of DAUNCE, baselines and score files"
    )
    for sub in (lds, removal):
        sub.add_argument("config", help="path of the run configuration (YAML)")
        sub.add_argument(
            "--baseline",
            action="append",
            metavar="METHOD",
            help="also evaluate a baseline (repeatable; adds to evaluation.baselines)",
        )
        sub.add_argument(
            "--scores",
            action="append",
            metavar="NAME=PATH",
            help="also evaluate a score matrix [n_train, m_query] (.npy, .npz or Zarr)",
        )
        sub.add_argument("--seeds", type=int, help="retraining seeds S")
        sub.add_argument("--overwrite", action="store_true")
        sub.add_argument("--workspace")
    lds.add_argument("--subsets", type=int, help="ground-truth subsets M (may grow later)")
    removal.add_argument("--sizes", type=int, nargs="+", help="numbers of examples removed")
    for name, text in (("runs", "list runs"), ("status", "state of a run (default: latest)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--workspace", default=DEFAULT_WORKSPACE)
        if name == "status":
            sub.add_argument("--run", help="run id (default: the latest run)")
    top = commands.add_parser("top", help="top proponents (or opponents) of a query")
    top.add_argument("--query", type=int, required=True, help="query id")
    top.add_argument("-k", type=int, default=10, help="how many (10)")
    top.add_argument("--opponents", action="store_true", help="most negative scores instead")
    top.add_argument(
        "--method", default="daunce", help="daunce (default) or a baseline the run has scored"
    )
    top.add_argument("--run", help="run id (default: the latest completed run)")
    top.add_argument("--workspace", default=DEFAULT_WORKSPACE)
    sql = commands.add_parser("sql", help="read-only SQL over the lineage and exports")
    sql.add_argument("query")
    sql.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (floats to 4 significant digits; the default), csv or json (full precision)",
    )
    sql.add_argument("--workspace", default=DEFAULT_WORKSPACE)
    demo = commands.add_parser("demo", help="run the attribute flow on the embedded digits data")
    demo.add_argument("--queries", type=int, default=3, help="queries to print (3)")
    demo.add_argument("--workspace", help="override the demo's workspace (./daunce-runs)")
    # Listed here; its own parser (`_serve_api`) reads its arguments, so that the other
    # commands need not import the server (torch, transformers) to start.
    commands.add_parser(
        "serve-api",
        help="serve a local model through an OpenAI-compatible API (fine-tuning, logprobs)",
    )
    return parser


def _serve_api(argv: list[str]) -> int:
    """``daunce serve-api``: the local OpenAI-compatible server (`daunce_core.access.api`)."""
    from daunce_core.access.api.server import add_arguments, run

    parser = argparse.ArgumentParser(
        prog="daunce serve-api",
        description="Serve a causal LM through an OpenAI-compatible API: files, LoRA "
        "fine-tuning jobs, models, completions with log-probabilities.",
    )
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv)) or 0
    except DaunceError as error:
        print(f"daunce: error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daunce`` console script.

    Returns:
        The exit status: 0, 2 after a `DaunceError` (its message on stderr), or 141 (128 +
        SIGPIPE, as the shell reports a program killed by it) when the reader of the output
        went away (``daunce sql ... | head -1``), quietly.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve-api"]:
        return _serve_api(argv[1:])
    args = _parser().parse_args(argv)
    try:
        from flows import commands

        status = getattr(commands, args.command.replace("-", "_"))(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at exit, past this handler
        return status
    except DaunceError as error:
        print(f"daunce: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit cannot fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured by a test, closed)
        pass


if __name__ == "__main__":
    sys.exit(main())

"""The server's command line: ``python -m daunce_core.access.api.server --model M ...``.

`add_arguments` fills any ``argparse`` parser (so ``daunce serve-api`` can reuse it) and `run`
starts the server from the parsed arguments; it returns when the server stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from daunce_core.access.api.server.faults import FaultSettings
from daunce_core.errors import DaunceError

KEYS_VARIABLE = "DAUNCE_SERVER_API_KEYS"
log = logging.getLogger("daunce.api.server")
FAULT_HELP = {
    "rate_limit": "most /v1 requests per second; the excess gets 429 + Retry-After (0: off)",
    "error_rate": "fraction of /v1 requests answered 500 or 503",
    "delay": "seconds slept before answering each /v1 request",
    "fail_jobs": "fraction of new fine-tuning jobs that fail while running (server_error)",
    "fail_first_jobs": "the next N fine-tuning jobs fail while running (server_error)",
    "drop_rate": "fraction of /v1 requests whose connection is closed without an answer",
    "step_delay": "seconds slept after each training step (keeps jobs running longer)",
    "lose_job_replies": "the next N jobs are created, then answered 500 (a lost answer)",
    "fault_seed": "seed of the random fault draws (default 0)",
}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's options to ``parser`` (returned)."""
    add = parser.add_argument
    add("--model", required=True, help="a model folder, or a preset: tiny, smollm2")
    add("--model-id", help="the base model's id in the API (default: folder or preset name)")
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    add("--port-file", help="write the bound port to this file once listening")
    add("--workdir", default="daunce-api", help="files, jobs, adapters (default ./daunce-api)")
    add(
        "--api-key",
        action="append",
        default=[],
        help=f"an accepted key (repeatable; also ${KEYS_VARIABLE}, comma-separated)",
    )
    add("--no-auth", action="store_true", help="accept requests without a key")
    add("--lora-rank", type=int, default=8, help="LoRA rank of fine-tuning jobs (default 8)")
    add("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    add("--base-lr", type=float, default=1e-3, help="learning rate at multiplier 1 (default 1e-3)")
    add("--n-epochs", type=int, default=3, help="epochs when a job says 'auto' (default 3)")
    add("--batch-size", type=int, default=8, help="batch size when a job says 'auto' (default 8)")
    add("--workers", type=int, default=1, help="fine-tuning threads (default 1)")
    add("--threads", type=int, help="torch threads (default: torch's own choice)")
    add("--max-batch", type=int, default=64, help="most prompts in one completions request")
    add("--log-level", default="info", help="logging level (default info)")
    faults = parser.add_argument_group("fault injection (also PUT /admin/faults)")
    for name, default in FaultSettings().__dict__.items():
        flag = "--" + name.replace("_", "-")
        faults.add_argument(flag, type=type(default), default=default, help=FAULT_HELP[name])
    return parser


def api_keys(args: argparse.Namespace) -> frozenset[str]:
    """The accepted keys: ``--api-key`` values and ``$DAUNCE_SERVER_API_KEYS``.

    Raises:
        DaunceError: no key is configured and ``--no-auth`` was not given.
    """
    keys = {k.strip() for k in args.api_key if k.strip()}
    keys |= {k.strip() for k in os.environ.get(KEYS_VARIABLE, "").split(",") if k.strip()}
    if not keys and not args.no_auth:
        raise DaunceError(
            f"no API key configured; give --api-key KEY (repeatable) or set {KEYS_VARIABLE}="
            "key1,key2, or pass --no-auth to accept requests without a key."
        )
    return frozenset() if args.no_auth and not keys else frozenset(keys)


def build(args: argparse.Namespace):
    """The ASGI application and its `Server` state from parsed arguments (loads the model)."""
    import torch

    from daunce_core.access.api.server.app import Server, create_app
    from daunce_core.access.api.server.faults import Faults
    from daunce_core.access.api.server.models import Registry, resolve_model
    from daunce_core.access.api.server.state import Store
    from daunce_core.access.api.server.worker import TrainDefaults, Trainer

    keys = api_keys(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    faults = Faults(FaultSettings(**{k: getattr(args, k) for k in FaultSettings().__dict__}))
    store = Store(args.workdir)
    folder, gguf = resolve_model(args.model, store.root / "models")
    model_id = args.model_id or (args.model if not Path(args.model).is_dir() else folder.name)
    registry = Registry(folder, model_id, store, gguf_file=gguf)
    defaults = TrainDefaults(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        base_lr=args.base_lr,
        n_epochs=args.n_epochs,
        batch_size=args.batch_size,
    )
    trainer = Trainer(store, registry, faults, defaults, workers=args.workers)
    server = Server(store, registry, trainer, faults, defaults, keys, max_batch=args.max_batch)
    return create_app(server), server


def run(args: argparse.Namespace) -> None:
    """Start the server and serve until interrupted."""
    import uvicorn

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app, server = build(args)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=args.log_level.lower(), access_log=False)
    server.trainer.start()
    log.info(
        "serving %s on http://%s:%d/v1 (workdir %s)",
        server.registry.base_id,
        args.host,
        port,
        args.workdir,
    )
    _Uvicorn(config, args.port_file, port).run(sockets=[sock])


class _Uvicorn:
    """A uvicorn server that writes its port to a file once it listens."""

    def __new__(cls, config, port_file: str | None, port: int):
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if port_file:
                    path = Path(port_file)
                    partial = path.with_name(path.name + ".partial")
                    partial.write_text(str(port))
                    partial.replace(path)

        return Server(config)


def main(argv: list[str] | None = None) -> int:
    """The ``python -m`` entry point: parse, run, and print a `DaunceError` as a clean message."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m daunce_core.access.api.server"))
    args = parser.parse_args(argv)
    try:
        run(args)
    except DaunceError as error:
        parser.exit(2, f"error: {error}\n")
    return 0

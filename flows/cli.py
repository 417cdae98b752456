"""The ``daunce`` command line."""

from __future__ import annotations

import argparse
import sys

from daunce_core.errors import DaunceError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daunce", description="DAUNCE data attribution.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="attribute a small MLP on the embedded digits data")
    demo.add_argument("--num-models", type=int, default=128, help="K perturbed copies (128)")
    demo.add_argument("--queries", type=int, default=3, help="queries to print (3)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data split and copies (0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``daunce`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from flows.demo import run_demo

            run_demo(num_models=args.num_models, queries_shown=args.queries, seed=args.seed)
    except DaunceError as error:
        print(f"daunce: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``actfleet``: the operator's command line.

Each sub-module registers its commands with ``register(subparsers)`` and gives each one a
``func(args) -> int``. A command reports failures with ``CLIError`` (printed as one line on
stderr, exit 2), never with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from agent.errors import ActfleetError
from config.logging import configure_logging

# Modules that contribute commands, in the order `actfleet --help` lists them.
_MODULES = ("service", "demo", "run", "client", "results", "keys", "bench", "fake_llm")


class CLIError(Exception):
    """A message for the user; the command exits with status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actfleet",
        description="Run CodeAct agents at scale: API, queue, workers, sandboxes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _MODULES:
        try:
            module = importlib.import_module(f"actfleet.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"actfleet.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Logs go to stderr (stdout is for results, and for one JSON document with --json);
    # the servers reconfigure from their settings.
    configure_logging("WARNING", "console")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CLIError, ActfleetError) as e:
        print(f"actfleet {args.command}: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:  # the settings (ACTFLEET_*) are invalid
        print(f"actfleet {args.command}: invalid settings: {settings_problems(e)}", file=sys.stderr)
        return 2


def settings_problems(error: ValidationError) -> str:
    """One line for every invalid setting, named by its environment variable."""
    out = []
    for err in error.errors():
        names = [f"ACTFLEET_{str(p).upper()}" for p in err.get("loc", ())]
        message = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        out.append(f"{'.'.join(names)}: {message}" if names else message)
    return "; ".join(out)


if __name__ == "__main__":
    sys.exit(main())

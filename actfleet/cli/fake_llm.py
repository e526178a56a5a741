"""``actfleet fake-llm``: serve a scripted OpenAI-compatible model server until Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from actfleet.cli import CLIError
from actfleet.fakellm import FakeLLMServer, ScriptError, load_script


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fake-llm",
        help="serve a scripted OpenAI-compatible model server (tests, demos, load tests)",
        description=(
            "Serve POST /v1/chat/completions from a script of rules (first match wins). "
            "Without --script, a built-in script solves tasks whose prompt says "
            "'Compute: EXPR'. Prints the base URL to use as OPENAI_BASE_URL."
        ),
    )
    p.add_argument("--script", metavar="FILE", help="JSON list of rules (see actfleet.fakellm)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8900, help="port to listen on (default %(default)s)")
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="seconds each reply takes, unless its rule says otherwise (default %(default)s)",
    )
    p.add_argument(
        "--capacity",
        type=int,
        metavar="K",
        help="serve at most K requests at once and answer 429 beyond (default: no limit)",
    )
    p.add_argument(
        "--retry-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the Retry-After of those 429s (default %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.latency < 0:
        raise CLIError("--latency must not be negative")
    if args.capacity is not None and args.capacity < 1:
        raise CLIError("--capacity must be at least 1")
    if args.retry_after < 0:
        raise CLIError("--retry-after must not be negative")
    try:
        rules = load_script(args.script) if args.script else None
    except ScriptError as e:
        raise CLIError(f"bad script: {e}") from e
    server = FakeLLMServer(
        rules,
        host=args.host,
        port=args.port,
        latency_s=args.latency,
        capacity=args.capacity,
        retry_after_s=args.retry_after,
    )
    try:
        url = server.start()
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
    print(url, flush=True)
    print(f"fake-llm: serving; export OPENAI_BASE_URL={url}  (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return 0

"""``actfleet demo``: the main job on one machine, with embedded defaults.

Starts the whole stack (``LocalStack``: a private redis-server, the API, a worker with
bwrap sandboxes), submits a batch file (the examples by default) through the HTTP API,
shows progress, then a summary table and a results file, and stops the stack. The model
is the server named by ``OPENAI_BASE_URL`` when it is set; otherwise the scripted
``fake-llm``, and the output says so plainly.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actfleet.cli import CLIError
from actfleet.cli.progress import summary_table, wait_with_progress, write_results
from actfleet.client import Client
from actfleet.fakellm import FakeLLMServer, load_script
from actfleet.stack import LocalStack, StackError
from config.settings import Settings
from store.apikeys import create_key
from store.keys import Keys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a batch file through a whole local stack (the README's main job)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", default="examples/batch.jsonl", help="%(default)s")
    p.add_argument(
        "--script",
        default="examples/fake_llm_script.json",
        help="the fake model's script, when OPENAI_BASE_URL is unset (default %(default)s)",
    )
    p.add_argument("--out", default="demo-results.jsonl", help="results file (%(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="agent loops (%(default)s)")
    p.set_defaults(func=demo)


MAX_TASK_ROWS = 50


def task_table(results: list[dict[str, Any]]) -> Table:
    table = Table(title="tasks")
    for column in ("custom_id", "status", "answer", "correct", "turns"):
        table.add_column(column)
    for r in results:
        correct = {True: "yes", False: "no", None: "-"}[r.get("correct")]
        table.add_row(
            str(r.get("custom_id") or r.get("task_id")),
            str(r.get("status")),
            escape(str(r.get("answer"))[:60]),
            correct,
            str(r.get("turns")),
        )
    return table


def demo(args: argparse.Namespace) -> int:
    settings = Settings()
    batch = Path(args.file)
    if not batch.is_file():
        raise CLIError(f"no such batch file: {batch}")
    console = Console(stderr=True, highlight=False)
    env = {"ACTFLEET_LOG_LEVEL": "WARNING"}
    with ExitStack() as stack:
        if os.environ.get("OPENAI_BASE_URL"):
            model = os.environ.get("ACTFLEET_MODEL", settings.model)
            console.print(f"model: [bold]{model}[/] at {os.environ['OPENAI_BASE_URL']}")
        else:
            fake = stack.enter_context(FakeLLMServer(script=load_script(args.script)))
            env |= {"OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": "fake"}
            console.print(
                "[bold yellow]OPENAI_BASE_URL is not set: the model is `actfleet fake-llm`, a "
                f"scripted stand-in replaying {args.script}, not a real LLM.[/]\n"
                "Set OPENAI_BASE_URL, OPENAI_API_KEY and ACTFLEET_MODEL to use a real one."
            )
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="actfleet-demo-")))
        console.print(f"starting the stack: redis, API, worker ({settings.sandbox} sandboxes)")
        try:
            local = stack.enter_context(
                LocalStack(
                    redis_url=settings.redis_url,
                    concurrency=args.concurrency,
                    env=env,
                    state_dir=state,
                )
            )
        except StackError as e:
            raise CLIError(f"{e} (logs: {state / 'logs'})") from e
        r = stack.enter_context(redis.Redis.from_url(local.redis_url or ""))
        key, _ = create_key(r, Keys(settings.key_prefix), "demo", "actfleet demo")
        client = stack.enter_context(Client(local.api_url, key))
        accepted = client.submit_batch(batch.read_bytes())
        console.print(
            f"API {local.api_url}: queued batch {accepted['id']} ({accepted['total']} tasks)"
        )
        status = wait_with_progress(client, accepted["id"], accepted["total"], 0.5, console)
        n = write_results(client, accepted["id"], Path(args.out), trajectory=True)
    out = Console(highlight=False)
    results = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    if len(results) <= MAX_TASK_ROWS:
        out.print(task_table(results))
    out.print(summary_table(status))
    console.print(f"{n} results (with trajectories) written to {args.out}")
    return 0

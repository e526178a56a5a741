"""Client commands against a running API: ``submit``, ``batch``, ``tail``.

They read ``ACTFLEET_API_URL`` and ``ACTFLEET_API_KEY``. Human output goes to the terminal
(rich); with ``--json`` a command prints one JSON document on stdout and nothing else there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from actfleet.cli import CLIError
from actfleet.cli.formats import batch_formats
from actfleet.cli.progress import summary_table, wait_with_progress, write_results
from actfleet.client import Client
from actfleet.render import render_event, result_table
from config.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("submit", help="submit one task to the API")
    s.add_argument("spec", nargs="?", metavar="SPEC.json", help="a task spec file ('-' = stdin)")
    s.add_argument("--prompt", help="the task, when no spec file is given")
    s.add_argument("--model", help="model name (default: the server's ACTFLEET_MODEL)")
    s.add_argument("--max-turns", type=int, help="limits.max_turns")
    s.add_argument("--follow", "-f", action="store_true", help="print its events live")
    s.add_argument("--json", action="store_true", help="print one JSON document")
    s.set_defaults(func=submit)

    b = sub.add_parser("batch", help="submit a JSONL file of task specs")
    b.add_argument("file", metavar="FILE.jsonl")
    b.add_argument("--wait", action="store_true", help="show progress until every task ends")
    b.add_argument("--out", help="with --wait: write results JSONL here (default BATCH_ID.jsonl)")
    b.add_argument("--poll-s", type=float, default=1.0, help="progress poll interval")
    b.add_argument(
        "--formats",
        metavar="LIST",
        help="submit the tasks once per action format (e.g. code,json,text), one batch each",
    )
    b.add_argument("--json", action="store_true", help="print one JSON document")
    b.add_argument("--webhook", metavar="URL", help="POST a signed batch.finished here at the end")
    b.set_defaults(func=batch)

    t = sub.add_parser("tail", help="follow a task's events until it finishes")
    t.add_argument("task_id", metavar="TASK_ID")
    t.add_argument("--from", dest="last_event_id", help="start after this event id")
    t.add_argument("--json", action="store_true", help="print events as JSON lines")
    t.set_defaults(func=tail)


def _client() -> Client:
    settings = Settings()
    if not settings.api_key:
        raise CLIError("set ACTFLEET_API_KEY (make one with `actfleet keys create --tenant NAME`)")
    return Client.from_settings(settings)


def _read_spec(args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.spec:
        text = sys.stdin.read() if args.spec == "-" else _read_text(args.spec)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{args.spec}: not JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(spec, dict):
            raise CLIError(f"{args.spec}: a task spec is a JSON object")
    if args.prompt:
        spec["prompt"] = args.prompt
    if args.model:
        spec["model"] = args.model
    if args.max_turns is not None:
        spec["limits"] = {**spec.get("limits", {}), "max_turns": args.max_turns}
    if "prompt" not in spec:
        raise CLIError("give a spec file or --prompt")
    return spec


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from e


def submit(args: argparse.Namespace) -> int:
    spec = _read_spec(args)
    console = Console(stderr=args.json, highlight=False)
    with _client() as client:
        accepted = client.submit(spec)
        task_id = accepted["id"]
        if not args.follow:
            if args.json:
                print(json.dumps(accepted))
            else:
                console.print(f"queued [bold]{task_id}[/]  (follow it: actfleet tail {task_id})")
            return 0
        if not args.json:
            console.print(f"queued [bold]{task_id}[/]")
        for ev in client.events(task_id):
            if not args.json:
                render_event(console, ev.event)
        task = client.task(task_id)
    if args.json:
        print(json.dumps(task))
    elif task.get("result"):
        console.print(result_table(task["result"], task_id))
    return 0 if task.get("status") == "completed" else 1


def tail(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    with _client() as client:
        for ev in client.events(args.task_id, last_event_id=args.last_event_id):
            if args.json:
                print(json.dumps({"id": ev.id, **ev.event}), flush=True)
            else:
                console.print(f"[dim]{ev.id}[/]", end=" ")
                render_event(console, ev.event)
    return 0


def batch(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"no such file: {args.file}")
    if args.formats is not None:
        with _client() as client:
            return batch_formats(args, client, path.read_bytes())
    console = Console(stderr=True, highlight=False)
    with _client() as client:
        accepted = client.submit_batch(path, webhook_url=args.webhook)  # streamed
        batch_id = accepted["id"]
        if not args.wait:
            if args.json:
                print(json.dumps(accepted))
            else:
                console.print(f"queued batch [bold]{batch_id}[/] ({accepted['total']} tasks)")
            return 0
        console.print(f"queued batch [bold]{batch_id}[/] ({accepted['total']} tasks)")
        status = wait_with_progress(client, batch_id, accepted["total"], args.poll_s, console)
        out = Path(args.out or f"{batch_id}.jsonl")
        n = write_results(client, batch_id, out, trajectory=False)
    if args.json:
        print(json.dumps({**status, "results_file": str(out)}))
    else:
        Console(highlight=False).print(summary_table(status))
        console.print(f"{n} results written to {out}")
    return 0

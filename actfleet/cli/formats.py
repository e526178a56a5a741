"""``actfleet batch FILE --formats code,json,text``: the paper's comparison in one command.

The same tasks are submitted once per action format, one batch each, with nothing changed
but ``action_format``: the tools stay the same Python functions in the sandbox, and each
format's system prompt documents them its own way (``agent.prompts``). The batches share
their ``custom_id``s, so ``actfleet report`` compares them task by task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from actfleet.cli import CLIError
from actfleet.cli.progress import wait_with_progress, write_results
from actfleet.cli.results import batches_table, comparison_table, read_results_file
from actfleet.client import ApiError, Client
from actfleet.report import build_report
from agent.models import ACTION_FORMATS


def parse_formats(text: str) -> list[str]:
    """``"code,json,text"`` as a list; a ``CLIError`` saying what to fix otherwise."""
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in ACTION_FORMATS]
    if not formats or unknown:
        bad = f" (not {', '.join(map(repr, unknown))})" if unknown else ""
        raise CLIError(
            f"--formats takes a comma-separated list of {', '.join(ACTION_FORMATS)}{bad}"
        )
    if len(set(formats)) != len(formats):
        raise CLIError(f"--formats names a format twice: {text}")
    return formats


def bodies_per_format(body: bytes, name: str, formats: list[str]) -> dict[str, bytes]:
    """The batch file (JSONL or a JSON array) once per format, ``action_format`` set on
    every task. A line that is not a JSON object is reported with its number; the API
    checks everything else."""
    text = body.decode("utf-8", errors="replace")
    specs: list[Any] = []
    if text.lstrip().startswith("["):
        try:
            specs = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{name}: not a JSON array ({e.msg} at line {e.lineno})") from e
        numbered = list(enumerate(specs, 1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise CLIError(f"{name} line {number}: not JSON ({e.msg})") from e
    for number, spec in numbered:
        if not isinstance(spec, dict):
            raise CLIError(f"{name} line {number}: a task spec is a JSON object")
    return {
        fmt: "".join(
            json.dumps({**spec, "action_format": fmt}, ensure_ascii=False) + "\n"
            for _, spec in numbered
        ).encode()
        for fmt in formats
    }


def submit_per_format(
    client: Client, bodies: dict[str, bytes], console: Console
) -> list[dict[str, Any]]:
    """Submit one batch per format; if one is refused, say which were already queued."""
    accepted: list[dict[str, Any]] = []
    for fmt, body in bodies.items():
        try:
            batch = client.submit_batch(body)
        except ApiError as e:
            if accepted:
                done = ", ".join(f"{b['format']} {b['id']}" for b in accepted)
                print(f"actfleet batch: already queued: {done}", file=sys.stderr)
            raise CLIError(f"the {fmt} batch was not queued: {e}") from e
        accepted.append({"format": fmt, **batch})
        console.print(f"queued batch [bold]{batch['id']}[/] ({fmt}, {batch['total']} tasks)")
    return accepted


def results_path(out: str | None, batch_id: str, fmt: str, several: bool) -> Path:
    """Where a batch's results go: ``--out`` (``NAME.FORMAT.jsonl`` for several formats),
    else ``BATCH_ID.jsonl``."""
    if out is None:
        return Path(f"{batch_id}.jsonl")
    path = Path(out)
    return path.with_name(f"{path.stem}.{fmt}{path.suffix or '.jsonl'}") if several else path


def batch_formats(args: argparse.Namespace, client: Client, body: bytes) -> int:
    formats = parse_formats(args.formats)
    console = Console(stderr=True, highlight=False)
    accepted = submit_per_format(client, bodies_per_format(body, args.file, formats), console)
    if not args.wait:
        if args.json:
            print(json.dumps({"batches": accepted}))
        return 0
    for batch in accepted:
        console.print(f"[bold]{batch['format']}[/]")
        batch["status"] = wait_with_progress(
            client, batch["id"], batch["total"], args.poll_s, console
        )
        path = results_path(args.out, batch["id"], batch["format"], len(accepted) > 1)
        write_results(client, batch["id"], path, trajectory=False)
        batch["results_file"] = str(path)
    report = build_report([(b["id"], read_results_file(Path(b["results_file"]))) for b in accepted])
    if args.json:
        print(json.dumps({"batches": accepted, "report": report.to_dict()}))
        return 0
    out = Console(highlight=False)
    out.print(batches_table(report))
    for c in report.comparisons:
        out.print(comparison_table(c))
    for b in accepted:
        console.print(f"{b['format']}: results written to {b['results_file']}")
    return 0

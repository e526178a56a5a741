"""Waiting for a batch with a progress bar, its summary table, and writing its results: what
``batch --wait``, ``batch --formats`` and ``demo`` share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from actfleet.client import Client


def wait_with_progress(
    client: Client, batch_id: str, total: int, poll_s: float, console: Console
) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("tasks", total=total, detail="")

        def show(status: dict[str, Any]) -> None:
            c = status["counts"]
            detail = f"running {c['running']}  ok {c['completed']}  failed " + str(
                c["failed"] + c["error"] + c["timed_out"]
            )
            progress.update(bar, completed=status["finished"], detail=detail)

        return client.wait_batch(batch_id, poll_s=poll_s, on_progress=show)


def summary_table(status: dict[str, Any]) -> Table:
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("batch", status["id"])
    for name, n in status["counts"].items():
        if n:
            table.add_row(name, str(n))
    rate = status.get("success_rate")
    table.add_row("success rate", "-" if rate is None else f"{rate:.1%}")
    turns = status.get("mean_turns")
    table.add_row("mean turns", "-" if turns is None else f"{turns:.2f}")
    usage = status["usage"]
    table.add_row("tokens", f"{usage['total_tokens']:,}")
    return table


def write_results(client: Client, batch_id: str, out: Path, trajectory: bool) -> int:
    n = 0
    with out.open("w") as f:
        for line in client.batch_results(batch_id, trajectory=trajectory):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n

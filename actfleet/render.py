"""Readable, terminal-friendly rendering of events and results (for `run`, `submit
--follow` and `tail`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

PREVIEW_CHARS = 1500


def _clip(text: str, limit: int = PREVIEW_CHARS) -> str:
    return (
        text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit} more characters)"
    )


def render_event(console: Console, event: dict[str, Any]) -> None:
    """Print one event (its ``to_dict()`` form) as a human would like to read it."""
    kind, turn, data = event.get("type"), event.get("turn", 0), event.get("data") or {}
    attempt = event.get("attempt", 1)
    tag = f"[dim]turn {turn}" + (f" · attempt {attempt}" if attempt and attempt > 1 else "") + "[/]"
    if kind == "llm.reply":
        content = data.get("content", "")
        prose = content.split("<execute>")[0].split("<solution>")[0].strip()
        console.print(f"{tag} [bold cyan]model[/] ({data.get('latency_s', 0):.2f}s)")
        if prose:
            console.print(escape(_clip(prose, 600)))
        if data.get("code"):
            console.print(
                Syntax(_clip(data["code"]), "python", theme="ansi_dark", line_numbers=False)
            )
        if data.get("answer") is not None:
            console.print(f"[bold green]answer:[/] {escape(str(data['answer']))}")
        if data.get("dropped"):
            console.print(
                f"[dim]{len(data['dropped'])} characters after the stop sequence dropped[/]"
            )
        if data.get("action") == "none":
            console.print("[yellow]no action: the model was nudged[/]")
    elif kind == "exec.result":
        flag = "[red]error[/]" if data.get("error") else "[green]ok[/]"
        if data.get("timed_out"):
            flag = "[red]timed out[/]"
        if data.get("state_lost"):
            flag = "[red]sandbox restarted[/]"
        console.print(f"{tag} [bold magenta]exec[/] {flag} ({data.get('duration_s', 0):.3f}s)")
        observation = str(data.get("observation", "")).removeprefix("Observation:\n")
        console.print(escape(_clip(observation)), style="dim")
    elif kind == "task.finished":
        console.print(f"[bold]finished:[/] {data.get('status')}")
    elif kind == "task.retrying":
        console.print(
            f"[yellow]retrying[/] as attempt {data.get('next_attempt')} in "
            f"{data.get('delay_s', 0):g}s ({data.get('failure_class')}): "
            f"{escape(str(data.get('error', '')))}"
        )
    else:
        console.print(f"[dim]{kind}[/] {escape(str(data)) if data else ''}")


def result_table(result: dict[str, Any], task_id: str | None = None) -> Table:
    """A two-column summary of a result record (``Result.to_dict()`` form)."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    if task_id:
        table.add_row("task", task_id)
    table.add_row("status", str(result.get("status")))
    if result.get("failure_class"):
        table.add_row("failure", str(result["failure_class"]))
    table.add_row("answer", escape(str(result.get("answer"))))
    if result.get("correct") is not None:
        table.add_row("correct", "yes" if result["correct"] else "no")
    table.add_row("turns", str(result.get("turns")))
    usage = result.get("usage") or {}
    table.add_row(
        "tokens",
        f"{usage.get('total_tokens', 0)} ({usage.get('prompt_tokens', 0)} prompt, "
        f"{usage.get('completion_tokens', 0)} completion)",
    )
    t = result.get("timings") or {}
    table.add_row(
        "timings",
        "  ".join(f"{k.removesuffix('_s')} {float(v):.2f}s" for k, v in t.items()),
    )
    if result.get("error"):
        table.add_row("reason", escape(str(result["error"])))
    return table

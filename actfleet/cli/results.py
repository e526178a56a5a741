"""What users take away from a batch: ``export`` (fine-tuning data, result rows) and
``report`` (figures per batch, paired comparisons, an HTML file with charts).

Each BATCH is a batch id, read from the API (``ACTFLEET_API_URL`` / ``ACTFLEET_API_KEY``),
or a results JSONL file on disk (what ``batch --wait --out`` and ``export`` write), read
with the same transforms the API uses (``agent.export``, ``actfleet.report``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actfleet.cli import CLIError
from actfleet.client import Client
from actfleet.report import Comparison, Report, build_report
from actfleet.report_html import render_html
from agent.export import FORMATS, Filter, export_line, needs_trajectory
from config.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "export",
        help="write a batch as fine-tuning data (openai, sharegpt) or result rows (JSONL)",
        description="Write a batch as JSONL: `openai` ({messages}) and `sharegpt` "
        "({conversations}) hold the tasks that answered, each ending with its answer; "
        "`results` holds one row per task (the default, as `GET /results` gives them).",
    )
    e.add_argument("batch", metavar="BATCH", help="a batch id, or a results JSONL file")
    e.add_argument("--format", dest="fmt", choices=FORMATS, default="results")
    e.add_argument("--only-correct", action="store_true", help="keep tasks graded correct")
    e.add_argument("--only-completed", action="store_true", help="keep tasks that answered")
    e.add_argument("--max-turns", type=int, metavar="N", help="keep tasks of at most N turns")
    e.add_argument("--out", required=True, help="file to write ('-' = stdout)")
    e.add_argument(
        "--trajectory",
        action="store_true",
        help="with --format results: include each task's messages",
    )
    e.set_defaults(func=export)

    r = sub.add_parser(
        "report",
        help="success rates with intervals, turns, tokens, failures; batches compared",
        description="Figures per batch (success rate with a 95%% Wilson interval, mean "
        "turns, tokens, wall time, failure classes) and, for batches over the same "
        "custom_ids, paired comparisons (difference with Newcombe's interval, exact McNemar "
        "test, the tasks one solved and the other did not).",
    )
    r.add_argument("batches", nargs="+", metavar="BATCH", help="batch ids or results files")
    r.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    r.add_argument("--json", action="store_true", help="print one JSON document")
    r.set_defaults(func=report)


class _Sources:
    """Reads BATCH arguments, opening an API client only when one is a batch id."""

    def __init__(self) -> None:
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            settings = Settings()
            if not settings.api_key:
                raise CLIError(
                    "set ACTFLEET_API_KEY to read a batch from the API (or give a results file)"
                )
            self._client = Client.from_settings(settings)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    @staticmethod
    def is_file(batch: str) -> bool:
        return Path(batch).is_file()

    def results(self, batch: str, trajectory: bool = False) -> Iterator[dict[str, Any]]:
        if self.is_file(batch):
            return read_results_file(Path(batch))
        return self.client().batch_results(batch, trajectory=trajectory)


def read_results_file(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of a results JSONL file; a bad line is a ``CLIError`` naming it."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror}") from e
    with f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise CLIError(f"{path} line {number}: not JSON ({e.msg})") from e
            if not isinstance(line, dict) or "status" not in line:
                raise CLIError(f"{path} line {number}: not a results line (no status)")
            yield line


@contextlib.contextmanager
def _output(out: str) -> Iterator[TextIO]:
    if out == "-":
        yield sys.stdout
        return
    try:
        f = open(out, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CLIError(f"cannot write {out}: {e.strerror}") from e
    with f:
        yield f


def export(args: argparse.Namespace) -> int:
    if args.trajectory and args.fmt != "results":
        raise CLIError(
            "--trajectory applies to --format results; openai and sharegpt always hold it"
        )
    if args.max_turns is not None and args.max_turns < 0:
        raise CLIError("--max-turns must be 0 or more")
    keep = Filter(args.only_correct, args.only_completed, args.max_turns)
    sources = _Sources()
    written = read = 0
    try:
        if sources.is_file(args.batch):
            lines = read_results_file(Path(args.batch))
            with _output(args.out) as out:
                for line in lines:
                    read += 1
                    row = export_line(line, args.fmt, keep, trajectory=args.trajectory)
                    if row is not None:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                        written += 1
            if written == 0 and read and needs_trajectory(args.fmt):
                print(
                    f"actfleet export: no task of {args.batch} has an answered trajectory "
                    "(a results file needs its messages: write it with "
                    "`actfleet export BATCH --trajectory`)",
                    file=sys.stderr,
                )
        else:
            rows = sources.client().export(
                args.batch,
                args.fmt,
                only_correct=args.only_correct,
                only_completed=args.only_completed,
                max_turns=args.max_turns,
                trajectory=args.trajectory,
            )
            with _output(args.out) as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
    finally:
        sources.close()
    if args.out != "-":
        print(f"{written} {args.fmt} lines written to {args.out}", file=sys.stderr)
    return 0


def report(args: argparse.Namespace) -> int:
    sources = _Sources()
    try:
        built = build_report([(b, sources.results(b)) for b in args.batches])
    finally:
        sources.close()
    if args.html:
        try:
            Path(args.html).write_text(render_html(built), encoding="utf-8")
        except OSError as e:
            raise CLIError(f"cannot write {args.html}: {e.strerror}") from e
    if args.json:
        print(json.dumps({**built.to_dict(), "html": args.html}, ensure_ascii=False))
        return 0
    console = Console(highlight=False)
    console.print(batches_table(built))
    for c in built.comparisons:
        console.print(comparison_table(c))
    if any(b.unfinished for b in built.batches):
        console.print("[yellow]some tasks have not finished; the figures leave them out[/]")
    if args.html:
        console.print(f"HTML report written to {args.html}")
    return 0


def batches_table(rep: Report) -> Table:
    """The batches side by side, one column each."""
    table = Table(title="Per batch", title_justify="left")
    table.add_column("")
    for b in rep.batches:
        table.add_column(escape(b.label), justify="right")

    def row(name: str, cell: Any) -> None:
        table.add_row(escape(name), *(escape(cell(b)) for b in rep.batches))

    row("source", lambda b: b.source)
    row("action format", lambda b: b.action_format)
    row(
        "tasks finished",
        lambda b: f"{b.finished}" + (f" (+{b.unfinished})" if b.unfinished else ""),
    )
    row("success rate", lambda b: _pct(b.success_rate))
    row(
        f"{rep.confidence:.0%} interval",
        lambda b: f"{_pct(b.success_ci[0])} to {_pct(b.success_ci[1])}",
    )
    row("graded correct", lambda b: f"{b.correct} of {b.graded}")
    row("mean turns", lambda b: _num(b.mean_turns))
    row("tokens", lambda b: f"{b.tokens['total']:,}")
    row(
        "wall s per task (mean / p95)",
        lambda b: f"{_num(b.wall_s['mean'])} / {_num(b.wall_s['p95'])}",
    )
    classes = sorted({c for b in rep.batches for c in b.failure_classes})
    for c in classes:
        row(f"failed: {c}", lambda b, c=c: str(b.failure_classes.get(c, 0)))
    return table


def comparison_table(c: Comparison) -> Table:
    title = f"{c.a} against {c.b} ({c.paired} shared tasks)"
    table = Table(title=escape(title), title_justify="left", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    lo, hi = c.difference_ci
    table.add_row("success rate", f"{_pct(c.rate_a)} against {_pct(c.rate_b)}")
    table.add_row("difference", f"{_signed(c.difference)} ({_signed(lo)} to {_signed(hi)})")
    table.add_row("p, exact McNemar", f"{c.p_value:.4g}")
    table.add_row("mean turns", f"{_num(c.mean_turns_a)} against {_num(c.mean_turns_b)}")
    table.add_row(escape(f"solved by {c.a} only"), escape(_ids(c.solved_only_by_a)))
    table.add_row(escape(f"solved by {c.b} only"), escape(_ids(c.solved_only_by_b)))
    return table


def _ids(ids: tuple[str, ...], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return f"{len(ids)}: {shown}{more}" if ids else "0"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"

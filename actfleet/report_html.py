"""An evaluation report as one self-contained HTML file: inline CSS and SVG, no script, no
request to anywhere, so it opens offline.

Charts: success rate per batch with its interval as an error bar, the distribution of
turns, and the failure classes. Every text that came from outside (labels, custom_ids,
answers, errors: model and sandbox output among them) is escaped, and a Content Security
Policy forbids scripts and remote loads should anything slip through.

Marks carry their numbers as ``data-*`` attributes (``data-batch``, ``data-value``,
``data-lo``, ``data-hi``, ``data-turns``, ``data-count``, ``data-class``), so a reader
program can check a chart against the figures.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence

from actfleet.report import BatchSummary, Comparison, Report

PALETTE = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#718096")
MAX_ROWS_PER_BATCH = 200  # unsolved tasks listed per batch
ANSWER_CHARS = 300

W, H = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 24, 56

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#1a202c;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #e2e8f0}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #e2e8f0;padding:4px 8px;
text-align:right;vertical-align:top}th{background:#f7fafc}td.text,th.text{text-align:left}
td.answer{text-align:left;font-family:ui-monospace,monospace;white-space:pre-wrap;
max-width:28em;word-break:break-word}
figure{display:inline-block;margin:1em 1em 1em 0}figcaption{font-weight:600}
svg text{font:12px system-ui,sans-serif;fill:#2d3748}.axis{stroke:#a0aec0}
.grid{stroke:#edf2f7}.errbar{stroke:#1a202c;stroke-width:1.5}
.legend span{display:inline-block;margin-right:1em}
.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.muted{color:#718096}
"""


def render_html(report: Report, title: str = "actfleet evaluation report") -> str:
    """The whole report as an HTML document."""
    colors = {b.label: PALETTE[i % len(PALETTE)] for i, b in enumerate(report.batches)}
    pct = f"{report.confidence:.0%}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # No script, no remote anything: the file is all there is.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">Generated {_e(time.strftime("%Y-%m-%d %H:%M:%S %Z"))}. '
        f"A task succeeds when it completed and its answer was not graded wrong. "
        f"Intervals are {pct}: Wilson for a success rate, Newcombe's paired interval for a "
        "difference; p is the exact McNemar test.</p>",
        _legend(report.batches, colors),
        '<h2 id="summary">Per batch</h2>',
        _summary_table(report.batches),
        '<h2 id="charts">Charts</h2>',
        _figure("Success rate", _success_chart(report.batches, colors)),
        _figure("Turns per task", _turns_chart(report.batches, colors)),
        _figure("Failure classes", _failures_chart(report.batches, colors)),
    ]
    if report.comparisons:
        parts += ['<h2 id="comparisons">Paired comparisons</h2>']
        parts += [_comparisons_table(report.comparisons)]
        parts += [_solved_by_one(c, report.batches) for c in report.comparisons]
    parts += ['<h2 id="unsolved">Tasks not solved</h2>']
    parts += [_unsolved(b) for b in report.batches]
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _legend(batches: Sequence[BatchSummary], colors: dict[str, str]) -> str:
    items = "".join(
        f'<span><i class="swatch" style="background:{colors[b.label]}"></i>{_e(b.label)}'
        f' <span class="muted">({_e(b.source)})</span></span>'
        for b in batches
    )
    return f'<p class="legend">{items}</p>'


def _summary_table(batches: Sequence[BatchSummary]) -> str:
    def row(name: str, metric: str, cells: Sequence[tuple[object, object]]) -> str:
        tds = "".join(
            f'<td data-batch="{_e(b.label)}" data-metric="{metric}" data-value="{_e(raw)}">'
            f"{_e(shown)}</td>"
            for b, (shown, raw) in zip(batches, cells, strict=True)
        )
        return f'<tr><th class="text">{_e(name)}</th>{tds}</tr>'

    head = "".join(f"<th>{_e(b.label)}</th>" for b in batches)
    rows = [
        row(
            "action format", "action_format", [(b.action_format, b.action_format) for b in batches]
        ),
        row("tasks finished", "finished", [(b.finished, b.finished) for b in batches]),
        row("not finished", "unfinished", [(b.unfinished, b.unfinished) for b in batches]),
        row("succeeded", "succeeded", [(b.succeeded, b.succeeded) for b in batches]),
        row(
            "success rate",
            "success_rate",
            [(_pct(b.success_rate), b.success_rate) for b in batches],
        ),
        row(
            "interval",
            "success_ci",
            [
                (
                    f"{_pct(b.success_ci[0])} to {_pct(b.success_ci[1])}",
                    f"{b.success_ci[0]!r},{b.success_ci[1]!r}",
                )
                for b in batches
            ],
        ),
        row(
            "graded correct",
            "correct",
            [(f"{b.correct} of {b.graded}", b.correct) for b in batches],
        ),
        row("mean turns", "mean_turns", [(_num(b.mean_turns), b.mean_turns) for b in batches]),
        row("tokens", "tokens", [(f"{b.tokens['total']:,}", b.tokens["total"]) for b in batches]),
        row(
            "tokens per task",
            "tokens_mean",
            [(_num(b.tokens["mean"], 0), b.tokens["mean"]) for b in batches],
        ),
        row(
            "wall time per task, mean (s)",
            "wall_mean",
            [(_num(b.wall_s["mean"]), b.wall_s["mean"]) for b in batches],
        ),
        row(
            "wall time per task, p50 (s)",
            "wall_p50",
            [(_num(b.wall_s["p50"]), b.wall_s["p50"]) for b in batches],
        ),
        row(
            "wall time per task, p95 (s)",
            "wall_p95",
            [(_num(b.wall_s["p95"]), b.wall_s["p95"]) for b in batches],
        ),
    ]
    classes = sorted({c for b in batches for c in b.failure_classes})
    for c in classes:
        rows.append(
            row(
                f"failure: {c}",
                f"failure:{c}",
                [(b.failure_classes.get(c, 0), b.failure_classes.get(c, 0)) for b in batches],
            )
        )
    return f'<table id="batches"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{svg}</figure>"


def _frame(chart_id: str, y_max: float, ticks: Sequence[tuple[float, str]], body: str) -> str:
    plot_h = H - TOP - BOTTOM
    grid = []
    for value, text in ticks:
        y = TOP + plot_h - plot_h * value / y_max
        grid.append(
            f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(text)}</text>'
        )
    axes = (
        f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{H - BOTTOM}"/>'
        f'<line class="axis" x1="{LEFT}" x2="{W - RIGHT}" y1="{H - BOTTOM}" y2="{H - BOTTOM}"/>'
    )
    return (
        f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img">{"".join(grid)}{axes}{body}</svg>'
    )


def _y(value: float, y_max: float) -> float:
    plot_h = H - TOP - BOTTOM
    return TOP + plot_h - plot_h * (value / y_max if y_max else 0)


def _bar(
    x: float, width: float, value: float, y_max: float, color: str, attrs: str, title: str
) -> str:
    top = _y(value, y_max)
    height = max(H - BOTTOM - top, 1.0)  # a zero still shows as a line
    return (
        f'<rect class="bar" {attrs} x="{x:.1f}" y="{H - BOTTOM - height:.1f}" '
        f'width="{width:.1f}" height="{height:.1f}" fill="{color}"><title>{_e(title)}</title></rect>'
    )


def _success_chart(batches: Sequence[BatchSummary], colors: dict[str, str]) -> str:
    slot = (W - LEFT - RIGHT) / max(len(batches), 1)
    width = min(slot * 0.6, 90)
    body = []
    for i, b in enumerate(batches):
        x = LEFT + slot * i + (slot - width) / 2
        rate = b.success_rate or 0.0
        attrs = f'data-batch="{_e(b.label)}" data-value="{b.success_rate!r}"'
        title = f"{b.label}: {_pct(b.success_rate)} of {b.finished}"
        body.append(_bar(x, width, rate, 1.0, colors[b.label], attrs, title))
        lo, hi = b.success_ci
        cx = x + width / 2
        y_lo, y_hi = _y(lo, 1.0), _y(hi, 1.0)
        body.append(
            f'<g class="errbar" data-batch="{_e(b.label)}" data-lo="{lo!r}" data-hi="{hi!r}">'
            f'<line class="errbar" x1="{cx:.1f}" x2="{cx:.1f}" y1="{y_lo:.1f}" y2="{y_hi:.1f}"/>'
            f'<line class="errbar" x1="{cx - 8:.1f}" x2="{cx + 8:.1f}" y1="{y_lo:.1f}" y2="{y_lo:.1f}"/>'
            f'<line class="errbar" x1="{cx - 8:.1f}" x2="{cx + 8:.1f}" y1="{y_hi:.1f}" y2="{y_hi:.1f}"/>'
            "</g>"
        )
        body.append(
            f'<text class="value" x="{cx + 12:.1f}" y="{_y(rate, 1.0) - 4:.1f}">{_e(_pct(b.success_rate))}</text>'
            f'<text x="{cx:.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{_e(b.label)}</text>'
        )
    ticks = [(v / 100, f"{v}%") for v in range(0, 101, 20)]
    return _frame("chart-success", 1.0, ticks, "".join(body))


def _grouped(
    chart_id: str,
    groups: Sequence[str],
    batches: Sequence[BatchSummary],
    counts: dict[tuple[str, str], int],
    colors: dict[str, str],
    key: str,
) -> str:
    y_max = max([*counts.values(), 1])
    slot = (W - LEFT - RIGHT) / max(len(groups), 1)
    width = min(slot * 0.8 / max(len(batches), 1), 40)
    body = []
    for gi, group in enumerate(groups):
        start = LEFT + slot * gi + (slot - width * len(batches)) / 2
        for bi, b in enumerate(batches):
            n = counts.get((b.label, group), 0)
            if n == 0:
                continue
            attrs = f'data-batch="{_e(b.label)}" data-{key}="{_e(group)}" data-count="{n}"'
            title = f"{b.label}, {group}: {n}"
            body.append(_bar(start + width * bi, width, n, y_max, colors[b.label], attrs, title))
        label_y = H - BOTTOM + 16
        cx = LEFT + slot * gi + slot / 2
        rotate = f' transform="rotate(20 {cx:.1f} {label_y})"' if len(groups) > 6 else ""
        body.append(
            f'<text x="{cx:.1f}" y="{label_y}" text-anchor="middle"{rotate}>{_e(group)}</text>'
        )
    step = max(1, round(y_max / 5))
    ticks = [(float(v), str(v)) for v in range(0, y_max + 1, step)]
    return _frame(chart_id, float(y_max), ticks, "".join(body))


def _turns_chart(batches: Sequence[BatchSummary], colors: dict[str, str]) -> str:
    turns = sorted({t for b in batches for t in b.turns})
    groups = [str(t) for t in range(turns[0], turns[-1] + 1)] if turns else []
    counts = {(b.label, str(t)): n for b in batches for t, n in b.turns.items()}
    return _grouped("chart-turns", groups, batches, counts, colors, "turns")


def _failures_chart(batches: Sequence[BatchSummary], colors: dict[str, str]) -> str:
    groups = sorted({c for b in batches for c in b.failure_classes})
    counts = {(b.label, c): n for b in batches for c, n in b.failure_classes.items()}
    return _grouped("chart-failures", groups, batches, counts, colors, "class")


def _comparisons_table(comparisons: Sequence[Comparison]) -> str:
    head = (
        '<tr><th class="text">A</th><th class="text">B</th><th>tasks</th><th>A rate</th>'
        "<th>B rate</th><th>A - B</th><th>interval</th><th>p (McNemar)</th>"
        "<th>only A solved</th><th>only B solved</th><th>A mean turns</th><th>B mean turns</th></tr>"
    )
    rows = []
    for c in comparisons:
        lo, hi = c.difference_ci
        rows.append(
            f'<tr class="comparison" data-a="{_e(c.a)}" data-b="{_e(c.b)}" '
            f'data-difference="{c.difference!r}" data-lo="{lo!r}" data-hi="{hi!r}" '
            f'data-p="{c.p_value!r}">'
            f'<td class="text">{_e(c.a)}</td><td class="text">{_e(c.b)}</td><td>{c.paired}</td>'
            f"<td>{_pct(c.rate_a)}</td><td>{_pct(c.rate_b)}</td>"
            f"<td>{_e(_signed_pct(c.difference))}</td>"
            f"<td>{_e(_signed_pct(lo))} to {_e(_signed_pct(hi))}</td><td>{c.p_value:.4g}</td>"
            f"<td>{c.only_a}</td><td>{c.only_b}</td>"
            f"<td>{_num(c.mean_turns_a)}</td><td>{_num(c.mean_turns_b)}</td></tr>"
        )
    return f'<table id="comparisons-table">{head}{"".join(rows)}</table>'


def _signed_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _solved_by_one(c: Comparison, batches: Sequence[BatchSummary]) -> str:
    rows = {b.label: {r.custom_id: r for r in b.rows} for b in batches}
    out = [f"<h3>{_e(c.a)} against {_e(c.b)}: tasks one solved and the other did not</h3>"]
    for winner, loser, ids in ((c.a, c.b, c.solved_only_by_a), (c.b, c.a, c.solved_only_by_b)):
        if not ids:
            out.append(f"<p>Nothing solved by {_e(winner)} alone.</p>")
            continue
        lines = []
        for cid in ids:
            w, lose = rows[winner].get(cid), rows[loser].get(cid)
            lines.append(
                f'<tr data-custom-id="{_e(cid)}"><td class="text">{_e(cid)}</td>'
                f'<td class="answer">{_e(_clip(w.answer if w else None))}</td>'
                f'<td class="text">{_e(lose.status if lose else "-")}'
                f"{_e(': ' + lose.failure_class if lose and lose.failure_class else '')}</td>"
                f'<td class="answer">{_e(_clip(lose.answer if lose else None))}</td></tr>'
            )
        out.append(
            f'<table class="solved-only" data-winner="{_e(winner)}" data-loser="{_e(loser)}">'
            f'<tr><th class="text">custom_id</th><th class="text">{_e(winner)} answered</th>'
            f'<th class="text">{_e(loser)}</th><th class="text">{_e(loser)} answered</th></tr>'
            f"{''.join(lines)}</table>"
        )
    return "\n".join(out)


def _unsolved(b: BatchSummary) -> str:
    failed = [r for r in b.rows if not r.succeeded]
    if not failed:
        return f"<p>{_e(b.label)}: every finished task succeeded.</p>"
    shown = failed[:MAX_ROWS_PER_BATCH]
    more = len(failed) - len(shown)
    lines = "".join(
        f'<tr><td class="text">{_e(r.custom_id or "-")}</td><td class="text">{_e(r.status)}</td>'
        f'<td class="text">{_e(r.failure_class or "-")}</td><td>{r.turns}</td>'
        f'<td class="answer">{_e(_clip(r.answer))}</td><td class="answer">{_e(_clip(r.error))}</td></tr>'
        for r in shown
    )
    note = f'<p class="muted">{more} more not listed.</p>' if more else ""
    return (
        f"<h3>{_e(b.label)}</h3>"
        f'<table class="unsolved" data-batch="{_e(b.label)}"><tr><th class="text">custom_id</th>'
        '<th class="text">status</th><th class="text">failure</th><th>turns</th>'
        f'<th class="text">answer</th><th class="text">error</th></tr>{lines}</table>{note}'
    )


def _clip(text: str | None) -> str:
    if text is None:
        return "-"
    return text if len(text) <= ANSWER_CHARS else text[:ANSWER_CHARS] + " …"

"""The HTML report in a real browser: Debian's chromium, headless, driven by Playwright.

The report is made the way a user makes it (``actfleet report A B --html FILE``) from two
results files, then opened offline from disk. The test checks that the charts rendered
(marks with a size, as many as the data has) and that the numbers shown are the ones
computed here, independently, from the results files; and that a model's answer holding
HTML stays text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# scripts/setup.sh installs chromium and playwright; in CI a missing one fails, not skips.
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (scripts/setup.sh installs it)",
)

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def results(fmt: str, outcomes: list[tuple[str, bool | None, int, str | None]]) -> str:
    lines = []
    for i, (status, correct, turns, failure) in enumerate(outcomes):
        lines.append(
            {
                "custom_id": f"task-{i}",
                "task_id": f"task_{fmt}_{i}",
                "status": status,
                "answer": HOSTILE if i == 3 else (str(i) if status == "completed" else None),
                "correct": correct,
                "failure_class": failure,
                "turns": turns,
                "usage": {
                    "prompt_tokens": 90 * turns,
                    "completion_tokens": 10 * turns,
                    "total_tokens": 100 * turns,
                },
                "timings": {"total_s": 2.0 * turns},
                "error": "out of turns" if failure == "max_turns" else None,
                "action_format": fmt,
            }
        )
    return "".join(json.dumps(x) + "\n" for x in lines)


CODE = [
    ("completed", True, 2, None),
    ("completed", True, 2, None),
    ("completed", True, 3, None),
    ("completed", False, 2, "wrong_answer"),
    ("completed", True, 1, None),
    ("failed", None, 5, "max_turns"),
]
JSON = [
    ("completed", True, 3, None),
    ("failed", None, 5, "max_turns"),
    ("completed", True, 4, None),
    ("failed", None, 5, "max_turns"),
    ("failed", None, 3, "stuck"),
    ("completed", True, 2, None),
]


@pytest.fixture
def report_file(tmp_path: Path) -> Iterator[tuple[Path, dict[str, list[dict[str, Any]]]]]:
    files = {}
    for fmt, outcomes in (("code", CODE), ("json", JSON)):
        files[fmt] = tmp_path / f"{fmt}.jsonl"
        files[fmt].write_text(results(fmt, outcomes))
    out = tmp_path / "report.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "actfleet",
            "report",
            str(files["code"]),
            str(files["json"]),
            "--html",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = {f: [json.loads(x) for x in p.read_text().splitlines()] for f, p in files.items()}
    yield out, lines


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def box(element: Any) -> dict[str, float]:
    b = element.bounding_box()
    assert b is not None, "not rendered"
    return b


def test_the_report_renders_its_charts_and_shows_the_results_files_numbers(
    report_file: tuple[Path, dict[str, list[dict[str, Any]]]], page: Any
) -> None:
    path, lines = report_file
    scipy_stats = pytest.importorskip("scipy.stats")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())

    # It is one file: nothing else was asked for, so it opens offline.
    assert requests == [path.as_uri()]

    for fmt, rows in lines.items():
        n = len(rows)
        ok = sum(r["status"] == "completed" and r["correct"] is not False for r in rows)
        ci = scipy_stats.binomtest(ok, n).proportion_ci(0.95, method="wilson")
        turns = sum(r["turns"] for r in rows) / n

        # the success bar: its value, a height in proportion, an error bar at the interval
        bar = page.locator(f'#chart-success rect.bar[data-batch="{fmt}"]')
        assert bar.count() == 1
        assert float(bar.get_attribute("data-value")) == pytest.approx(ok / n)
        assert box(bar)["height"] > 0 and box(bar)["width"] > 0
        err = page.locator(f'#chart-success g.errbar[data-batch="{fmt}"]')
        assert float(err.get_attribute("data-lo")) == pytest.approx(ci.low)
        assert float(err.get_attribute("data-hi")) == pytest.approx(ci.high)
        assert box(err)["height"] > 0

        # the table shows the same figures as text
        def cell(metric: str, fmt: str = fmt) -> str:
            return str(
                page.locator(
                    f'#batches td[data-batch="{fmt}"][data-metric="{metric}"]'
                ).inner_text()
            )

        assert cell("success_rate") == f"{ok / n:.1%}"
        assert cell("success_ci") == f"{ci.low:.1%} to {ci.high:.1%}"
        assert cell("mean_turns") == f"{turns:.2f}"
        assert cell("tokens") == f"{sum(r['usage']['total_tokens'] for r in rows):,}"
        assert cell("finished") == str(n)

        # one turns bar per number of turns that occurs, each as tall as its count
        want_turns = Counter(r["turns"] for r in rows)
        bars = page.locator(f'#chart-turns rect.bar[data-batch="{fmt}"]')
        assert bars.count() == len(want_turns)
        got_turns = {
            int(b.get_attribute("data-turns")): int(b.get_attribute("data-count"))
            for b in bars.all()
        }
        assert got_turns == dict(want_turns)
        heights = {int(b.get_attribute("data-count")): box(b)["height"] for b in bars.all()}
        assert all(h > 0 for h in heights.values())
        assert sorted(heights, key=heights.__getitem__) == sorted(heights)

        want_failures = Counter(r["failure_class"] for r in rows if r["failure_class"])
        fbars = page.locator(f'#chart-failures rect.bar[data-batch="{fmt}"]')
        assert {
            b.get_attribute("data-class"): int(b.get_attribute("data-count")) for b in fbars.all()
        } == dict(want_failures)
        assert all(box(b)["height"] > 0 for b in fbars.all())

    # the paired comparison, counted here from the two files
    solved = {
        fmt: {r["custom_id"] for r in rows if r["status"] == "completed" and r["correct"]}
        for fmt, rows in lines.items()
    }
    only_code = sorted(solved["code"] - solved["json"], key=lambda c: int(c.split("-")[1]))
    only_json = solved["json"] - solved["code"]
    assert only_code == ["task-1", "task-4"] and only_json == {"task-5"}  # the data's design
    row = page.locator('tr.comparison[data-a="code"][data-b="json"]')
    assert row.count() == 1
    n = len(lines["code"])
    diff = (len(solved["code"]) - len(solved["json"])) / n
    assert float(row.get_attribute("data-difference")) == pytest.approx(diff)
    p = scipy_stats.binomtest(len(only_json), len(only_code) + len(only_json), 0.5).pvalue
    assert float(row.get_attribute("data-p")) == pytest.approx(p)
    listed = page.locator('table.solved-only[data-winner="code"] tr[data-custom-id]')
    assert [r.get_attribute("data-custom-id") for r in listed.all()] == only_code

    # the model's HTML is shown as text and ran nothing
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0 and page.locator("script").count() == 0
    assert HOSTILE in page.locator("body").inner_text()

"""``actfleet run``: one task, in this process, with no Redis and no queue."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from actfleet.cli import CLIError
from actfleet.render import render_event, result_table
from agent.errors import InfrastructureError, SpecError
from agent.llm import LLM
from agent.loop import run_codeact
from agent.models import FailureClass, Result, Status, TaskSpec, Timings
from agent.sandbox import LazySandbox, Sandbox
from config.settings import Settings
from engines.re2engine import RE2Engine, spec_problems


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run one task in-process (no Redis) and show its trajectory live",
        description="Run one task in this process: the model named by OPENAI_BASE_URL / "
        "ACTFLEET_MODEL (or --fake-llm), a sandbox of ACTFLEET_SANDBOX.",
    )
    p.add_argument("spec", nargs="?", help="task spec file (JSON; '-' for stdin)")
    p.add_argument("--prompt", help="the task, instead of a spec file")
    p.add_argument("--setup-code", help="Python run in the sandbox before turn 1")
    p.add_argument("--model", help="model name (default: the spec's, else ACTFLEET_MODEL)")
    p.add_argument("--max-turns", type=int, help="override limits.max_turns")
    p.add_argument("--sandbox", choices=["bwrap", "docker"], help="override ACTFLEET_SANDBOX")
    p.add_argument(
        "--fake-llm",
        nargs="?",
        const="",
        metavar="SCRIPT",
        help="answer with the built-in scripted model (or SCRIPT) instead of a model server",
    )
    p.add_argument("--json", action="store_true", help="print the result record as JSON")
    p.set_defaults(func=run)


def load_spec(args: argparse.Namespace) -> TaskSpec:
    raw: dict[str, Any]
    if args.spec and args.prompt:
        raise CLIError("give a spec file or --prompt, not both")
    if args.spec:
        try:
            text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        except OSError as e:
            raise CLIError(f"cannot read {args.spec}: {e.strerror}") from e
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{args.spec} is not valid JSON: {e}") from e
    elif args.prompt:
        raw = {"prompt": args.prompt}
    else:
        raise CLIError("give a task spec file or --prompt")
    if not isinstance(raw, dict):
        raise CLIError(f"{args.spec}: a task spec is a JSON object")
    if args.setup_code:
        raw["setup_code"] = args.setup_code
    if args.max_turns is not None:
        raw.setdefault("limits", {})["max_turns"] = args.max_turns
    try:
        spec = TaskSpec.from_dict(raw)
    except SpecError as e:
        raise CLIError("invalid task spec:\n  " + "\n  ".join(e.problems)) from e
    problems = spec_problems(spec)
    if problems:
        raise CLIError("invalid task spec:\n  " + "\n  ".join(problems))
    return spec


def run(args: argparse.Namespace) -> int:
    from actfleet.fakellm import FakeLLMServer, load_script
    from workers.llm import OpenAILLM
    from workers.sandbox import make_provider

    settings = Settings()
    if args.sandbox:
        settings = settings.model_copy(update={"sandbox": args.sandbox})
    spec = load_spec(args)
    model = args.model or spec.model or settings.model
    console = Console(stderr=args.json, highlight=False)
    task_id = "local_" + uuid.uuid4().hex[:12]

    with ExitStack() as stack:
        base_url = None
        if args.fake_llm is not None:
            script = load_script(args.fake_llm) if args.fake_llm else None
            server = stack.enter_context(FakeLLMServer(script=script, port=0))
            base_url = server.url
            console.print(f"[dim]model: the scripted fake-llm at {base_url}[/]")
        llm = OpenAILLM(
            base_url=base_url,
            timeout_s=settings.llm_timeout_s,
            max_retries=settings.llm_max_retries,
        )
        stack.callback(llm.close)
        provider = make_provider(settings, worker_id=task_id)
        stack.callback(provider.close)
        pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="sandbox-start"))
        sandbox = LazySandbox(pool.submit(provider.start, spec, task_id))
        stack.callback(sandbox.close)
        started = time.time()
        result = _drive(spec, llm, sandbox, model, started, console)
        result = replace(result, timings=replace(result.timings, sandbox_s=sandbox.waited_s))

    if args.json:
        print(json.dumps({"task_id": task_id, "model": model, **result.to_dict()}, indent=2))
    else:
        console.print()
        console.print(result_table(result.to_dict(), task_id))
    return 0 if result.status is Status.COMPLETED and result.correct is not False else 1


def _drive(
    spec: TaskSpec, llm: LLM, sandbox: Sandbox, model: str, started: float, console: Console
) -> Result:
    gen = run_codeact(spec, llm, sandbox, model=model, started_at=started, regex=RE2Engine())
    try:
        while True:
            render_event(console, next(gen).event.to_dict())
    except StopIteration as stop:
        return stop.value
    except InfrastructureError as e:
        return Result(
            Status.ERROR,
            FailureClass.of_fault(e),
            error=str(e),
            timings=Timings(total_s=time.time() - started),
        )

"""The in-sandbox runner, run as a plain subprocess (no isolation), driven by SessionClient."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.sandbox.protocol import PipeChannel, RunnerDeadline, SessionClient

RUNNER = Path(__file__).resolve().parents[2] / "sandbox_images" / "python" / "runner.py"


class Session:
    def __init__(self, work_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=work_dir,
            bufsize=0,
        )
        self.client = SessionClient(PipeChannel.for_process(self.proc), grace_s=1.0)
        self.hello = self.client.wait_ready(10.0)

    def run(self, code: str, timeout_s: float = 10.0, max_output_chars: int = 2000):
        return self.client.execute(code, timeout_s, max_output_chars)

    def peak_rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.client.close()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    yield s
    s.close()


def test_runner_says_hello_with_its_pid_and_python_version(session: Session) -> None:
    assert session.hello["ready"] is True
    assert session.hello["pid"] == session.proc.pid
    assert session.hello["python"].startswith("3.")


def test_state_persists_across_cells_like_a_notebook(session: Session) -> None:
    session.run("import math\nx = 20\ndef double(v):\n    return 2 * v")
    result = session.run("double(x) + math.floor(1.5)")
    assert result.value == "41"
    assert result.ok


def test_last_bare_expression_is_returned_as_repr_unless_none(session: Session) -> None:
    assert session.run("'a' + 'b'").value == "'ab'"
    assert session.run("print('hi')").value is None
    assert session.run("y = 3").value is None
    assert session.run("y = 3\ny * 2").value == "6"


def test_user_namespace_is_a_clean_main_module(session: Session) -> None:
    result = session.run("sorted(k for k in globals() if not k.startswith('__'))")
    assert result.value == "[]"
    assert session.run("__name__").value == "'__main__'"
    assert session.run("import sys; sys.modules['__main__'].__dict__ is globals()").value == "True"


def test_stdout_and_stderr_are_captured_at_the_fd_level(session: Session) -> None:
    result = session.run(
        "import os, subprocess, sys\n"
        "print('from print')\n"
        "os.system('echo from shell')\n"
        "subprocess.run(['sh', '-c', 'echo to stderr >&2'])\n"
        "os.write(1, b'raw fd\\n')\n"
        "print('py err', file=sys.stderr)"
    )
    assert result.stdout == "from print\nfrom shell\nraw fd\n"
    assert result.stderr == "to stderr\npy err\n"


def test_output_of_one_cell_does_not_leak_into_the_next(session: Session) -> None:
    session.run("print('first')")
    assert session.run("print('second')").stdout == "second\n"


def test_traceback_shows_the_users_cell_and_source_not_the_runner(session: Session) -> None:
    session.run("def inner():\n    return 1 / 0")
    result = session.run("x = 1\ninner()")
    assert result.error is not None
    assert 'File "<cell 2>", line 2, in <module>' in result.error
    assert 'File "<cell 1>", line 2, in inner' in result.error
    assert "return 1 / 0" in result.error
    assert result.error.endswith("ZeroDivisionError: division by zero")
    assert "runner.py" not in result.error


def test_syntax_error_names_the_cell(session: Session) -> None:
    result = session.run("def broken(:\n    pass")
    assert result.error is not None
    assert '<cell 1>", line 1' in result.error
    assert "SyntaxError" in result.error


def test_timeout_interrupts_the_code_and_the_namespace_survives(session: Session) -> None:
    session.run("kept = 'still here'")
    started = time.monotonic()
    result = session.run("import time\nwhile True:\n    time.sleep(0.01)", timeout_s=0.5)
    assert time.monotonic() - started < 1.5
    assert result.timed_out
    assert result.error is not None
    assert "interrupted after 0.5 s" in result.error
    assert "<cell 2>" in result.error and "runner.py" not in result.error
    assert session.run("kept").value == "'still here'"


def test_code_that_swallows_the_interrupt_is_cut_off_by_the_host_deadline(
    session: Session,
) -> None:
    stubborn = (
        "import time\nwhile True:\n    try:\n        time.sleep(10)\n"
        "    except BaseException:\n        pass"
    )
    started = time.monotonic()
    with pytest.raises(RunnerDeadline):
        session.run(stubborn, timeout_s=0.5)
    assert time.monotonic() - started == pytest.approx(1.5, abs=0.5)


def test_huge_output_is_capped_head_and_tail_with_bounded_memory(session: Session) -> None:
    before_kb = session.peak_rss_kb()
    result = session.run(
        "import sys\nsys.stdout.write('HEAD')\n"
        "for _ in range(100):\n    sys.stdout.write('x' * 1_000_000)\n"
        "sys.stdout.write('TAIL')",
        timeout_s=60,
        max_output_chars=1000,
    )
    assert result.stdout.startswith("HEAD")
    assert result.stdout.endswith("TAIL")
    assert "[... 100000008 characters cut ...]" not in result.stdout  # it shows some text
    assert "characters cut ...]" in result.stdout
    assert len(result.stdout) < 1100
    assert session.peak_rss_kb() - before_kb < 30_000  # far from the 100 MB printed


def test_huge_subprocess_output_is_capped_too(session: Session) -> None:
    result = session.run(
        "import os\nos.system('head -c 100000000 /dev/zero | tr \"\\\\0\" y')",
        timeout_s=60,
        max_output_chars=100,
    )
    assert result.stdout.startswith("y" * 50)
    assert "[... 99999900 characters cut ...]" in result.stdout


def test_forked_children_never_answer_on_the_protocol_channel(session: Session) -> None:
    result = session.run("import os\npid = os.fork()\nif pid == 0:\n    raise SystemExit\npid > 0")
    assert result.value == "True"
    assert session.run("1 + 1").value == "2"


def test_put_file_writes_into_the_work_dir_and_refuses_escapes(
    session: Session, tmp_path: Path
) -> None:
    session.client.put_file("sub/dir/a.txt", b"content")
    assert (tmp_path / "sub" / "dir" / "a.txt").read_bytes() == b"content"
    assert session.run("open('sub/dir/a.txt').read()").value == "'content'"
    for bad in ("/etc/evil", "../evil", "a/../../evil"):
        with pytest.raises(ValueError):
            session.client.put_file(bad, b"x")


def test_system_exit_and_input_do_not_kill_the_session(session: Session) -> None:
    assert "SystemExit" in (session.run("raise SystemExit(3)").error or "")
    assert "EOFError" in (session.run("input()").error or "")
    assert session.client.ping() < 1.0

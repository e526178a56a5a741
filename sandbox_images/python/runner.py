"""actfleet's in-sandbox runner: a resident Python session, driven over a framed JSON channel.

Stdlib only: it runs inside the sandbox with whatever ``python3`` (>= 3.11) is there.

Start it as ``python3 runner.py`` with the protocol on stdin (requests) and stdout
(responses); the working directory is the task's work dir. At startup the runner moves the
protocol to private duplicated descriptors and points fd 0 at /dev/null and fds 1/2 at
capture pipes, so nothing the user's code (or a subprocess it starts) writes can corrupt
the channel.

Wire format: each frame is a 4-byte big-endian unsigned length followed by that many bytes
of UTF-8 JSON (never pickle). On start the runner sends
``{"ready": true, "pid": int, "python": "3.11.x"}``. Requests and responses:

``{"op": "exec", "id": n, "code": str, "timeout_s": float, "max_output_chars": int}``
    -> ``{"id": n, "stdout": str, "stderr": str, "value": str|null, "error": str|null,
    "timed_out": bool, "duration_s": float}``
``{"op": "put_file", "id": n, "path": rel, "content_b64": str}``
    -> ``{"id": n, "ok": true}`` or ``{"id": n, "ok": false, "error": str}``
``{"op": "ping", "id": n}`` -> ``{"id": n, "ok": true, "pong": true}``

Exit status ``EXIT_OUT_OF_MEMORY`` (86) means the runner itself ran out of memory.
"""

# Imports are few and cheap on purpose: every sandbox pays for them at start, and a fleet
# starts many sandboxes. ``json`` and ``signal`` would pull in ``re`` and ``enum`` (about as
# much CPU as the interpreter's own start), so their C halves are used directly; ``_ast``
# and ``compile(..., PyCF_ONLY_AST)`` stand in for ``ast``; ``traceback`` and ``linecache``
# are imported when first needed.
import _ast
import _signal
import _thread
import binascii
import builtins
import os
import resource
import struct
import sys
import time

try:
    from _json import encode_basestring as _encode_str
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:  # a Python without the C accelerator: the json package it is
    _make_scanner = None

EXIT_OUT_OF_MEMORY = 86
EXIT_PROTOCOL = 87
MAX_REQUEST_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: not the start of a char
_END_WAIT_S = 1.0
_RUNNER_FILE = __file__  # how long to wait for the capture threads to see the end-of-cell marker


def _not_json(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class _ScanContext:
    """What ``_json.make_scanner`` reads off a ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name.replace("Infinity", "inf"))


if _make_scanner is not None:
    _scan = _make_scanner(_ScanContext())
    _encode = _make_encoder(None, _not_json, _encode_str, None, ":", ",", False, False, True)

    def json_dumps(value: object) -> str:
        return "".join(_encode(value, 0))

    def json_loads(text: str) -> object:
        try:
            value, end = _scan(text, 0)
        except StopIteration as e:
            raise ValueError(f"not JSON at character {e.value}") from None
        if text[end:].strip():
            raise ValueError(f"extra data after the JSON value at character {end}")
        return value

else:
    import json

    def json_dumps(value: object) -> str:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))

    json_loads = json.loads


class _Event:
    """``threading.Event`` on a bare lock (``threading`` costs an import of collections)."""

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        if self._lock.locked():
            try:
                self._lock.release()
            except RuntimeError:  # set twice at once
                pass

    def clear(self) -> None:
        self._lock.acquire(False)

    def wait(self, timeout_s: float) -> bool:
        if self._lock.acquire(True, timeout_s):
            self._lock.release()
            return True
        return False


class ExecutionTimeout(BaseException):
    """Raised inside the user's code when its time is up (BaseException: harder to swallow)."""


def _cont(data: bytes) -> int:
    """How many UTF-8 continuation bytes ``data`` holds (bytes minus this = characters)."""
    return len(data) - len(data.translate(None, _CONTINUATION))


def cap_text(text: str, max_chars: int) -> str:
    """Keep the head and tail of ``text`` and say how much was cut."""
    if len(text) <= max_chars:
        return text
    half = max(max_chars // 2, 1)
    cut = len(text) - 2 * half
    return f"{text[:half]}\n[... {cut} characters cut ...]\n{text[-half:]}"


class _Capture:
    """Owns one of fds 1/2: a pipe whose read end a daemon thread drains for ever.

    Per cell the thread keeps only a bounded head and tail of what it read, and counts the
    rest, so printing 100 MB costs a bounded amount of memory. The end of a cell is marked
    by writing a per-session random token into the pipe (atomic: shorter than PIPE_BUF).
    """

    def __init__(self, fd: int, token: bytes) -> None:
        self.fd = fd
        self.token = token
        read_end, write_end = os.pipe()
        self.read_end = read_end
        self.write_end = write_end  # kept so fd 1/2 can be restored if user code closed them
        os.dup2(write_end, fd)
        os.set_inheritable(fd, True)
        self.lock = _thread.allocate_lock()
        self.done = _Event()
        self.limit = 8192
        self._reset()
        _thread.start_new_thread(self._pump, ())

    def _reset(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total_bytes = 0
        self.tail_chars_dropped = 0
        self.carry = b""

    def begin(self, max_chars: int) -> None:
        with self.lock:
            self._reset()
            self.limit = max(4 * max_chars, 64)  # UTF-8: at most 4 bytes a char
            self.done.clear()
        try:  # undo any os.close(1) / dup2 of the last cell
            os.dup2(self.write_end, self.fd)
        except OSError:
            pass

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.read_end, 65536)
            except InterruptedError:
                continue
            if not data:
                return
            with self.lock:
                self._feed(self.carry + data)

    def _feed(self, data: bytes) -> None:
        at = data.find(self.token)
        if at >= 0:
            self._keep(data[:at])
            self.carry = b""
            self.done.set()
            rest = data[at + len(self.token) :]
            if rest:  # a background process wrote after the marker: next cell's output
                self._feed(rest)
            return
        # the token may straddle two reads: hold back a possible prefix of it
        keep_back = 0
        for n in range(min(len(self.token) - 1, len(data)), 0, -1):
            if self.token.startswith(data[-n:]):
                keep_back = n
                break
        self._keep(data[: len(data) - keep_back])
        self.carry = data[len(data) - keep_back :]

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self.total_bytes += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - self.limit
            if excess > 0:
                self.tail_chars_dropped += excess - _cont(bytes(self.tail[:excess]))
                del self.tail[:excess]

    def end(self, max_chars: int) -> str:
        try:
            os.write(self.fd, self.token)
        except OSError:
            pass
        self.done.wait(_END_WAIT_S)
        with self.lock:
            head = bytes(self.head)
            tail = bytes(self.tail)
            dropped = self.tail_chars_dropped
            self._reset()
        if not dropped:
            return cap_text((head + tail).decode("utf-8", "replace"), max_chars)
        head_text = head.decode("utf-8", "replace")
        tail_text = tail.decode("utf-8", "replace")
        half = max(max_chars // 2, 1)
        cut = len(head_text) - half + dropped + len(tail_text) - half
        return f"{head_text[:half]}\n[... {cut} characters cut ...]\n{tail_text[-half:]}"


class SessionServer:
    """The session: the namespace every cell runs in, the output captures, and the
    protocol loop that serves the host's ``SessionClient`` (``workers.sandbox.protocol``)."""

    def __init__(self) -> None:
        # Move the protocol off fds 0/1 and keep a private copy of the original stderr.
        self.proto_in = os.dup(0)
        self.proto_out = os.dup(1)
        self.log_fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        token = b"\x00<actfleet-end-of-cell-" + binascii.hexlify(os.urandom(12)) + b">\x00"
        self.captures = (_Capture(1, token), _Capture(2, token))
        sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr.reconfigure(line_buffering=True)
        sys.__stdin__ = sys.stdin  # type: ignore[misc]
        sys.__stdout__ = sys.stdout  # type: ignore[misc]
        sys.__stderr__ = sys.stderr  # type: ignore[misc]
        module = type(sys)("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        self.namespace = module.__dict__
        self.cell = 0
        self.sources: dict[str, str] = {}
        self.pid = os.getpid()
        self.in_user_code = False
        self.reserve: bytearray | None = bytearray(
            1 << 20
        )  # freed on MemoryError to get room to answer
        self._timeout_message = ""
        _signal.signal(_signal.SIGALRM, self._on_alarm)

    # -- protocol -----------------------------------------------------------------------

    def send(self, message: dict) -> None:
        body = json_dumps(message).encode("utf-8", "surrogatepass")
        data = memoryview(_HEADER.pack(len(body)) + body)
        while data:
            n = os.write(self.proto_out, data)
            data = data[n:]

    def _read_exact(self, n: int) -> bytes | None:
        chunks = []
        while n:
            try:
                chunk = os.read(self.proto_in, min(n, 1 << 20))
            except InterruptedError:
                continue
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv(self) -> dict | None:
        header = self._read_exact(4)
        if header is None:
            return None
        (length,) = _HEADER.unpack(header)
        if length > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {length} bytes is too large")
        body = self._read_exact(length)
        if body is None:
            return None
        message = json_loads(body.decode("utf-8"))
        if not isinstance(message, dict):
            raise ValueError("a request must be a JSON object")
        return message

    def serve(self) -> int:
        self.send(
            {"ready": True, "pid": os.getpid(), "python": ".".join(map(str, sys.version_info[:3]))}
        )
        while True:
            try:
                request = self.recv()
            except (ValueError, UnicodeDecodeError) as e:
                self._log(f"actfleet-runner: bad request: {e}")
                return EXIT_PROTOCOL
            if request is None:
                return 0
            try:
                self.send(self.handle(request))
            except MemoryError:
                self.reserve = None
                try:
                    self.send({"id": request.get("id"), "error": self._oom_message()})
                except MemoryError:
                    self._log("actfleet-runner: out of memory")
                    return EXIT_OUT_OF_MEMORY
                self.reserve = bytearray(1 << 20)

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        rid = request.get("id")
        if op == "exec":
            return {"id": rid, **self.execute(request)}
        if op == "put_file":
            return {"id": rid, **self.put_file(request)}
        if op == "ping":
            return {"id": rid, "ok": True, "pong": True}
        return {"id": rid, "ok": False, "error": f"unknown op {op!r}"}

    def _log(self, text: str) -> None:
        try:
            os.write(self.log_fd, (text + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    # -- files --------------------------------------------------------------------------

    def put_file(self, request: dict) -> dict:
        path = request.get("path")
        if not isinstance(path, str) or not path or path.startswith(("/", "\\")):
            return {"ok": False, "error": "path must be a relative path inside the work dir"}
        parts = path.replace("\\", "/").split("/")
        if ".." in parts or "" in parts:
            return {"ok": False, "error": "path must not contain '..' or empty parts"}
        try:
            content = binascii.a2b_base64(request.get("content_b64") or "", strict_mode=True)
        except (binascii.Error, ValueError):
            return {"ok": False, "error": "content_b64 is not valid base64"}
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        except OSError as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True}

    # -- execution ----------------------------------------------------------------------

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self.in_user_code:
            raise ExecutionTimeout(self._timeout_message)

    def _compile(self, code: str, filename: str) -> tuple[object, object]:
        tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST)
        last = None
        if tree.body and isinstance(tree.body[-1], _ast.Expr):
            last = _ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec") if tree.body else None
        return body, (compile(last, filename, "eval") if last is not None else None)

    def execute(self, request: dict) -> dict:
        code = request.get("code")
        if not isinstance(code, str):
            return {"error": "exec: code must be a string", "timed_out": False}
        timeout_s = float(request.get("timeout_s") or 30.0)
        max_chars = int(request.get("max_output_chars") or 2000)
        self.cell += 1
        filename = f"<cell {self.cell}>"
        self.sources[filename] = code
        if "linecache" in sys.modules:  # the user's code uses it (inspect, traceback, ...)
            self._register_sources()
        self._timeout_message = f"the execution was interrupted after {timeout_s:g} s (time limit)"
        for capture in self.captures:
            capture.begin(max_chars)
        value = error = None
        timed_out = False
        started = time.perf_counter()
        try:
            try:
                body, last = self._compile(code, filename)
                _signal.setitimer(_signal.ITIMER_REAL, max(timeout_s, 0.001))
                self.in_user_code = True
                try:
                    if body is not None:
                        exec(body, self.namespace)
                    if last is not None:
                        result = eval(last, self.namespace)
                        if result is not None:
                            value = cap_text(repr(result), max_chars)
                finally:
                    self.in_user_code = False
                    _signal.setitimer(_signal.ITIMER_REAL, 0)
            except ExecutionTimeout as e:
                timed_out = True
                error = self._format_error(e, max_chars)
            except MemoryError as e:
                self.reserve = None  # room to format the error
                error = self._format_oom(e) + "\n" + self._oom_message(in_cell=True)
            except BaseException as e:  # SystemExit and KeyboardInterrupt included: keep serving
                error = self._format_error(e, max_chars)
        finally:
            if os.getpid() != self.pid:  # a child the user's code forked must not answer
                os._exit(0)
            duration = time.perf_counter() - started
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # the user may have closed or replaced it
                    pass
            stdout = self.captures[0].end(max_chars)
            stderr = self.captures[1].end(max_chars)
            if self.reserve is None:
                self.reserve = bytearray(1 << 20)
        return {
            "stdout": stdout,
            "stderr": stderr,
            "value": value,
            "error": error,
            "timed_out": timed_out,
            "duration_s": round(duration, 6),
        }

    def _format_error(self, exc: BaseException, max_chars: int) -> str:
        """A traceback of the user's frames only: the runner's own (the ``exec`` call at
        the bottom, the alarm handler at the top) are dropped."""
        import traceback

        self._register_sources()
        summary = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        pending = [summary]
        while pending:
            te = pending.pop()
            te.stack = traceback.StackSummary.from_list(
                [f for f in te.stack if f.filename != _RUNNER_FILE]
            )
            pending.extend(t for t in (te.__cause__, te.__context__) if t is not None)
        text = "".join(summary.format()).rstrip("\n")
        return cap_text(text, max(max_chars, 2000))

    def _format_oom(self, exc: MemoryError) -> str:
        """The traceback of a MemoryError, built by hand: importing ``traceback`` may need
        more memory than there is."""
        lines = ["Traceback (most recent call last):"]
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_filename != _RUNNER_FILE:
                lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
                source = self.sources.get(code.co_filename, "").splitlines()
                if 0 < tb.tb_lineno <= len(source):
                    lines.append("    " + source[tb.tb_lineno - 1].strip())
            tb = tb.tb_next
        lines.append(f"MemoryError: {exc}" if str(exc) else "MemoryError")
        return "\n".join(lines)

    def _register_sources(self) -> None:
        """Let linecache (so tracebacks and ``inspect``) see the source of every cell."""
        import linecache

        for filename, code in self.sources.items():
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)

    def _oom_message(self, in_cell: bool = False) -> str:
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        limit = "" if soft == resource.RLIM_INFINITY else f" (limit {soft // (1024 * 1024)} MB)"
        if in_cell:
            return f"The allocation failed: the sandbox is out of memory{limit}."
        return f"The sandbox ran out of memory{limit}."


# -- zygote mode: the bwrap backend's fork server ---------------------------------------
#
# ``python3 runner.py --zygote FD`` serves spawn requests on FD (a SOCK_SEQPACKET socket to
# the worker, ``workers/sandbox/zygote.py`` says the protocol). It never runs untrusted
# code: each sandbox is a fork of it that, once in its own cgroups (the worker moves it and
# then writes the go byte), makes its own namespaces and becomes the session above, without
# a second interpreter start. Three processes per sandbox:
#
#   C  forked by the zygote; waits for the go byte; unshares a user, mount, pid, net, ipc,
#      uts and cgroup namespace; maps 65534 to itself; makes the zygote's /dev read-only;
#      mounts a private /work, /tmp, /dev/shm and /dev/pts; brings up its loopback; forks
#      G and exits with its status.
#   G  pid 1 of the new pid namespace, killed with C (PR_SET_PDEATHSIG): mounts its /proc,
#      caps nested user namespaces at 0, forks R and reaps orphans until R exits. Its exit
#      kills everything left in the namespace.
#   R  sets the rlimits, drops every capability and runs ``main`` on the passed fds.

EXIT_ZYGOTE_SETUP = 88  # a sandbox's setup failed before the runner ran (see its log)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 1 << 14, 1 << 18
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 1, 24, 47, 4
_PR_SET_NO_NEW_PRIVS = 38
_CAP_VERSION_3 = 0x20080522
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_INOTIFY_INSTANCES, _INOTIFY_WATCHES = 16, 8192  # of the host's 128 and 8192+ per uid


class _Libc:
    """The few libc calls Python 3.11's ``os`` lacks, raising ``OSError`` like ``os``."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(flags), "unshare")

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
        c = self.ctypes
        result = self.lib.mount(
            source.encode(), target.encode(), fstype.encode() if fstype else None,
            c.c_ulong(flags), data.encode() if data else None,
        )  # fmt: skip
        self._check(result, f"mount {fstype or source} on {target}")

    def prctl(self, option: int, arg: int = 0, arg3: int = 0) -> None:
        c = self.ctypes
        result = self.lib.prctl(option, c.c_ulong(arg), c.c_ulong(arg3), c.c_ulong(0), c.c_ulong(0))
        self._check(result, f"prctl {option}")

    def drop_capabilities(self) -> None:
        """Empty the bounding, ambient, effective, permitted and inheritable sets."""
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            self.prctl(_PR_CAPBSET_DROP, cap)
        self.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        header = struct.pack("=Ii", _CAP_VERSION_3, 0)
        self._check(self.lib.capset(header, bytes(24)), "capset")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _recv_fds(sock: object, count: int) -> tuple[bytes, list[int]]:
    import _socket

    size = _socket.CMSG_SPACE(count * 4)
    data, ancillary, _, _ = sock.recvmsg(65536, size)  # type: ignore[attr-defined]
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += struct.unpack(f"={usable // 4}i", payload[:usable])
    return data, fds


def serve_zygote(control_fd: int) -> int:
    """The fork server's loop; returns once the worker's end of the socket is closed and
    the last of its sandboxes has exited (its exit would kill them: they are in its pid
    namespace).

    Spawn request: ``{"op": "spawn", "limits": {...}, "mounts": {...}}`` with five fds
    (the runner's stdin and stdout, its log, a status pipe, a go pipe); answer: ``{"pid":
    int}`` (the child's pid in the zygote's namespace) with a pidfd of the child. When a
    child exits its status (``os.waitstatus_to_exitcode``) is written to its status pipe
    as 4 bytes, big-endian, and the pipe closed."""
    import _socket
    import select

    libc = _Libc()  # loaded here, once: a sandbox inherits it with the fork
    sock = _socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda signum, frame: None)
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    status_pipes: dict[int, int] = {}  # child pid -> write end of its status pipe
    poller = select.poll()
    poller.register(control_fd, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    closing = False
    sock.sendall(json_dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                while True:
                    try:
                        if not os.read(wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
                _reap(status_pipes)
                if closing and not status_pipes:
                    return 0
                continue
            data, fds = _recv_fds(sock, 5)
            if not data:
                for passed in fds:
                    os.close(passed)
                closing = True
                poller.unregister(control_fd)
                _reap(status_pipes)
                if not status_pipes:
                    return 0
                continue
            try:
                request = json_loads(data.decode())
                if not isinstance(request, dict) or len(fds) != 5:
                    raise ValueError("a spawn request is a JSON object with 5 fds")
                pid = os.fork()
                if pid == 0:
                    keep = [control_fd, wake_r, wake_w, *status_pipes.values()]
                    _child(libc, request, fds, keep)  # never returns
                status_pipes[pid] = fds[3]
                fds[3] = -1
                pidfd = os.pidfd_open(pid)
                try:
                    sock.sendmsg(
                        [json_dumps({"pid": pid}).encode()],
                        [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("=i", pidfd))],
                    )
                finally:
                    os.close(pidfd)
            except (OSError, ValueError) as e:
                sock.sendall(json_dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            finally:
                for passed in fds:
                    if passed >= 0:
                        os.close(passed)
            _reap(status_pipes)


def _reap(status_pipes: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_pipes.pop(pid, -1)
        if fd >= 0:
            try:
                os.write(fd, struct.pack(">i", os.waitstatus_to_exitcode(status)))
            except OSError:  # the worker closed its end: it no longer cares
                pass
            os.close(fd)


def _child(libc: _Libc, request: dict, fds: list[int], close: list[int]) -> None:
    """C: see the section's comment. Exits, never returns."""
    log_fd = fds[2]
    try:
        for fd in close:
            os.close(fd)
        os.close(fds[3])  # the status pipe is the zygote's to write
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        os.setsid()  # no controlling terminal to push input into (TIOCSTI), as bwrap does
        go = os.read(fds[4], 1)
        os.close(fds[4])
        if go != b"g":  # the worker could not put it in its cgroups: give up
            os._exit(EXIT_ZYGOTE_SETUP)
        uid, gid = os.getuid(), os.getgid()
        libc.unshare(
            _CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC
            | _CLONE_NEWUTS | _CLONE_NEWCGROUP
        )  # fmt: skip
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        mounts = request["mounts"]
        libc.mount("none", "/", "", _MS_REC | _MS_PRIVATE)
        flags = _MS_NOSUID | _MS_NODEV
        # bwrap's /dev is a tmpfs the sandbox's uid owns, and every sibling has the
        # zygote's: read-only here, so that no task leaves files there for another.
        libc.mount("none", "/dev", "", _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
        libc.mount(
            "tmpfs", "/work", "tmpfs", flags,
            f"size={mounts['work_bytes']},nr_inodes={mounts['work_files']},mode=0700,"
            f"uid={uid},gid={gid}",
        )  # fmt: skip
        for target in ("/tmp", "/dev/shm"):
            libc.mount("tmpfs", target, "tmpfs", flags, f"size={mounts['tmpfs_bytes']},mode=1777")
        libc.mount("devpts", "/dev/pts", "devpts", _MS_NOSUID | _MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=620")  # fmt: skip
        import _socket
        import fcntl

        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        ifreq = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0))
        up = struct.unpack("16sh22x", ifreq)[1] | _IFF_UP
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", up))
        s.close()
        _socket.sethostname("sandbox")
        alive_r, alive_w = os.pipe()
        init = os.fork()
        if init == 0:
            os.close(alive_w)
            _init(libc, request, fds, alive_r)  # never returns
        for fd in (fds[0], fds[1], alive_r):
            os.close(fd)
        while True:
            try:
                _, status = os.waitpid(init, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    except BaseException as e:
        _log_exit(log_fd, f"actfleet-zygote: the sandbox's setup failed: {e!r}")


def _init(libc: _Libc, request: dict, fds: list[int], alive_r: int) -> None:
    """G: pid 1 of the sandbox; exits with the runner's status. Never returns."""
    log_fd = fds[2]
    try:
        libc.prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL)
        import select

        if select.select([alive_r], [], [], 0)[0]:  # C died before PDEATHSIG was set
            os._exit(EXIT_ZYGOTE_SETUP)
        os.close(alive_r)
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # pid 1: nothing in here may stop it
        libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        _write("/proc/sys/user/max_user_namespaces", "0")  # no nested user namespace
        # The kernel also counts these per host uid, which all of a zygote's sandboxes
        # share: a share each, so that no one sandbox can use up its siblings'.
        _write("/proc/sys/user/max_inotify_instances", str(_INOTIFY_INSTANCES))
        _write("/proc/sys/user/max_inotify_watches", str(_INOTIFY_WATCHES))
        runner = os.fork()
        if runner == 0:
            _runner(libc, request, fds)  # never returns
        for fd in fds[:3]:
            os.close(fd)
        while True:
            try:
                pid, status = os.wait()
            except InterruptedError:
                continue
            except ChildProcessError:
                os._exit(EXIT_ZYGOTE_SETUP)
            if pid == runner:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
    except BaseException as e:
        _log_exit(log_fd, f"actfleet-zygote: the sandbox's init failed: {e!r}")


def _runner(libc: _Libc, request: dict, fds: list[int]) -> None:
    """R: limits, no capabilities, then the session on fds 0, 1, 2. Never returns."""
    log_fd = fds[2]
    try:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        limits = request["limits"]
        for name, value in (
            ("RLIMIT_AS", limits["as"]),
            ("RLIMIT_CPU", limits["cpu"]),
            ("RLIMIT_NPROC", limits["nproc"]),
            ("RLIMIT_FSIZE", limits["fsize"]),
            ("RLIMIT_NOFILE", limits["nofile"]),
            ("RLIMIT_CORE", 0),
        ):
            resource.setrlimit(getattr(resource, name), (value, value))
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # set by bwrap already; says so here too
        libc.drop_capabilities()
        os.chdir("/work")
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.closerange(3, 1 << 20)  # the zygote's numbers may be above the new limit
        sys.argv[1:] = []
        code = main()
    except BaseException as e:
        _log_exit(log_fd, f"actfleet-zygote: the runner's setup failed: {e!r}")
    sys.stdout.flush = sys.stderr.flush = lambda: None  # type: ignore[method-assign]
    os._exit(code)


def _log_exit(log_fd: int, text: str) -> None:
    try:
        os.write(log_fd, (text + "\n").encode("utf-8", "replace"))
    finally:
        os._exit(EXIT_ZYGOTE_SETUP)


def main() -> int:
    runner = SessionServer()
    try:
        return runner.serve()
    except MemoryError:
        runner._log("actfleet-runner: out of memory")
        return EXIT_OUT_OF_MEMORY


if __name__ == "__main__":
    if sys.argv[1:2] == ["--zygote"]:
        os._exit(serve_zygote(int(sys.argv[2])))
    code = main()
    sys.stdout.flush = sys.stderr.flush = lambda: None  # type: ignore[method-assign]
    os._exit(code)

"""The host folders of bwrap sandboxes: who owns them, their size-capped ``/work``, and
clearing what dead processes left behind.

Every folder a process makes is ``<base>/actfleet-bwrap-<tag>-*`` (``<tag>``: ``p<pid>``
and a random suffix, one per process and base dir), and the process holds an exclusive
``flock`` on ``<base>/actfleet-bwrap-<tag>.lock`` for as long as it lives. The kernel drops
the lock when the process dies, however it dies, so ``clear_stale`` can tell the folders of
dead processes from those of live ones (other workers, other sessions on the machine, in
any pid namespace) by trying the lock. Folders of the older ``actfleet-bwrap-<random>``
form name no owner and are left alone.

``/work`` is a tmpfs of ``size`` bytes and at most ``nr_inodes`` files and directories.
A process allowed to mount (root, as workers usually run) mounts it on the sandbox's
host folder (``mount_work``), so it survives a restart of the sandbox's runner like a
plain folder would; otherwise bwrap mounts one inside the sandbox (``--size --tmpfs``),
which caps the size only (the file count is then bounded by the memory cgroup, which the
kernel charges for inodes) and is empty again after a restart of the runner.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

PREFIX = "actfleet-bwrap-"
_TAGGED = re.compile(r"^actfleet-bwrap-(p\d+[0-9a-f]{6})\.lock$")
_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2

_owners: dict[Path, tuple[str, int]] = {}  # base dir -> (tag, fd of the held lock)
_owners_lock = threading.Lock()


def base_path(base_dir: str | None) -> Path:
    return Path(base_dir or tempfile.gettempdir())


def owner_tag(base_dir: str | None) -> str:
    """This process's tag in ``base_dir``, taking its lock the first time."""
    base = base_path(base_dir)
    with _owners_lock:
        found = _owners.get(base)
        if found is not None:
            return found[0]
        for _ in range(10):
            tag = f"p{os.getpid()}{secrets.token_hex(3)}"
            path = base / f"{PREFIX}{tag}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A clearer may have taken the lock between our create and flock, and
                # unlinked the file: then ours locks nothing anyone can see; take another.
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    _owners[base] = (tag, fd)
                    atexit.register(_release, base, tag)
                    return tag
            except OSError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, "could not take a lock for the sandbox folders", str(base))


def _release(base: Path, tag: str) -> None:
    """At exit, the lock file goes if no folder of ours is left; one that is left (a
    sandbox never closed) keeps it, for ``clear_stale`` to find once we are gone."""
    if not any(base.glob(f"{PREFIX}{tag}-*")):
        with contextlib.suppress(OSError):
            (base / f"{PREFIX}{tag}.lock").unlink()


def make_root(base_dir: str | None) -> Path:
    """A new, empty sandbox folder owned by this process."""
    tag = owner_tag(base_dir)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{tag}-", dir=base_path(base_dir)))


def shared_dir(base_dir: str | None) -> Path:
    """A new folder for what this process's sandboxes share (the runner, passwd...)."""
    tag = owner_tag(base_dir)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{tag}-shared-", dir=base_path(base_dir)))


def clear_stale(base_dir: str | None = None) -> list[Path]:
    """Remove the sandbox folders of every dead process in ``base_dir`` (default: the
    system temp dir), unmounting a ``/work`` tmpfs left mounted; return what was removed.
    Folders of live processes, this one included, are kept."""
    base = base_path(base_dir)
    own = {tag for (tag, _) in _owners.values()}
    removed: list[Path] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        found = _TAGGED.match(name)
        if found is None or found.group(1) in own:
            continue
        tag = found.group(1)
        try:
            fd = os.open(base / name, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # gone: another process cleared it
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its owner lives
                continue
            for folder in sorted(base.glob(f"{PREFIX}{tag}-*")):
                remove_root(folder)
                removed.append(folder)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base / name)
        finally:
            os.close(fd)
    return removed


def log_tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a sandbox's (or a zygote's) log, as text ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def remove_root(root: Path) -> None:
    """Remove a sandbox folder, unmounting its ``work`` tmpfs first if it has one."""
    unmount_work(root / "work")
    shutil.rmtree(root, ignore_errors=True)


_libc = ctypes.CDLL(None, use_errno=True)
_mounting = {"refused": False}  # set once the kernel said this process may not mount


def mount_work(work: Path, size_mb: int, files: int, uid: int, *, host: bool = True) -> bool:
    """Mount a tmpfs of ``size_mb`` and ``files`` inodes, owned by ``uid``, on ``work``;
    False if this process may not mount, or ``host`` is False (then bwrap mounts one
    inside the sandbox)."""
    if not host or _mounting["refused"]:
        return False
    options = f"size={size_mb}m,nr_inodes={files},mode=0700,uid={uid},gid={uid}"
    flags = _MS_NOSUID | _MS_NODEV
    if _libc.mount(b"tmpfs", os.fsencode(work), b"tmpfs", flags, options.encode()) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EACCES, errno.ENOSYS):
        _mounting["refused"] = True
        return False
    raise OSError(err, os.strerror(err), str(work))


def unmount_work(work: Path) -> None:
    if os.path.ismount(work):
        _libc.umount2(os.fsencode(work), _MNT_DETACH)

"""The network rule, enforced: a test process (and every Python process it starts) may talk
to loopback, Unix sockets and the test's own network-namespace hosts, and nothing else.

``install()`` wraps ``socket.getaddrinfo`` (every name lookup Python makes, asyncio's
included) and ``socket.socket.connect``/``connect_ex``/``sendto``: a name that would need DNS,
or a destination outside loopback and ``ACTFLEET_NETGUARD_ALLOW`` (comma-separated CIDRs, for
hosts a test made itself with ``ip netns``), raises ``NetworkRuleViolation`` *before* a
packet leaves, and is appended to the file named by ``ACTFLEET_NETGUARD_LOG``, so an attempt
that a library swallows still fails the test session (``tests/conftest.py`` reads the log).

Subprocesses get it through ``sitecustomize`` (this folder is put first on ``PYTHONPATH``).
Code under test that resolves names through a function of its own, which a test replaces,
never reaches ``getaddrinfo`` and so is not affected.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import traceback
from collections.abc import Iterator
from typing import Any

ALLOW_ENV = "ACTFLEET_NETGUARD_ALLOW"
LOG_ENV = "ACTFLEET_NETGUARD_LOG"
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class NetworkRuleViolation(ConnectionRefusedError):
    """A test tried to reach an address the network rule forbids."""


_expected = 0


@contextlib.contextmanager
def expected() -> Iterator[None]:
    """Refusals inside this block are what a test of the guard wants: raise, don't log."""
    global _expected
    _expected += 1
    try:
        yield
    finally:
        _expected -= 1


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_nets: list[Network] = []


def allow(cidr: str) -> None:
    """Let this process and the processes it starts from now on reach ``cidr``: hosts a test
    made itself (``ip netns``)."""
    _nets.append(ipaddress.ip_network(cidr, strict=False))
    os.environ[ALLOW_ENV] = ",".join(p for p in (os.environ.get(ALLOW_ENV, ""), cidr) if p)


def _allowed_networks() -> list[Network]:
    nets: list[Network] = [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("0.0.0.0/32"),  # "this host" on Linux
        ipaddress.ip_network("::/128"),
    ]
    for part in os.environ.get(ALLOW_ENV, "").split(","):
        if part.strip():
            nets.append(ipaddress.ip_network(part.strip(), strict=False))
    return nets


def _hosts_file_names() -> frozenset[str]:
    """Names /etc/hosts maps to loopback: resolving them sends nothing."""
    names: set[str] = set()
    try:
        with open("/etc/hosts") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and _is_loopback_literal(fields[0]):
                    names.update(n.lower() for n in fields[1:])
    except OSError:
        pass
    return frozenset(names)


def _is_loopback_literal(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _violation(what: str) -> NetworkRuleViolation:
    log = os.environ.get(LOG_ENV)
    if log and not _expected:
        stack = "".join(traceback.format_stack(limit=12)[:-2])
        try:
            with open(log, "a") as f:
                f.write(f"pid {os.getpid()}: {what}\n{stack}\n")
        except OSError:
            pass
    return NetworkRuleViolation(f"network rule: {what} (only loopback and test-made hosts)")


def install() -> None:
    if getattr(socket, "_actfleet_netguard", False):
        return
    _nets[:] = _allowed_networks()
    nets = _nets
    local_names = LOCAL_NAMES | _hosts_file_names()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto

    def address_ok(host: Any) -> bool:
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        try:
            ip = ipaddress.ip_address(str(host).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in nets)

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or address_ok(name) or str(name).lower().rstrip(".") in local_names:
            return real_getaddrinfo(host, *args, **kw)
        raise _violation(f"name lookup of {name!r} would query DNS")

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not address_ok(address[0]):
            raise _violation(f"connection to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(self, address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> int:
        address = args[-1]
        check(self, address)
        return real_sendto(self, data, *args)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign,assignment]
    socket._actfleet_netguard = True  # type: ignore[attr-defined]

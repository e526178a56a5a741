"""The network guard the test session runs under refuses what the network rule forbids,
before anything is sent, in this process and in the processes tests start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netguard.guard import NetworkRuleViolation, expected


def test_a_lookup_that_needs_dns_is_refused() -> None:
    with expected(), pytest.raises(NetworkRuleViolation, match="would query DNS"):
        socket.getaddrinfo("actfleet-netguard-probe.example", 80)


def test_a_connection_outside_loopback_is_refused_before_it_is_made() -> None:
    with (
        expected(),
        socket.socket() as s,
        pytest.raises(NetworkRuleViolation, match="connection to"),
    ):
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: refused before a SYN leaves


def test_loopback_and_local_names_stay_usable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("localhost", port), timeout=5):
            conn, _ = server.accept()
            conn.close()


def test_a_child_python_process_is_guarded_too() -> None:
    code = (
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 9), timeout=1)\n"
        "except ConnectionRefusedError as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    log = os.environ["ACTFLEET_NETGUARD_LOG"]
    before = Path(log).read_text()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "refused NetworkRuleViolation"
    # The attempt was logged; take it back out so this deliberate one does not fail the session.
    with open(log, "r+") as f:
        after = f.read()
        assert "192.0.2.1" in after[len(before) :]
        f.seek(0)
        f.truncate()
        f.write(before)

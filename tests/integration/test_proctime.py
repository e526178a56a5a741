"""CPU of process trees from /proc: reaped and live descendants both count, once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from actfleet.proctime import TreeCPU, tree_cpu

# A parent that runs one child to completion (and reaps it), then starts a second that
# stays alive, each burning about 0.4 s of CPU; the parent itself only sleeps.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass\\n"
    subprocess.run([sys.executable, "-c", burn], check=True)
    live = subprocess.Popen([sys.executable, "-c", burn + "import time; time.sleep(60)"])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_trees_cpu_counts_reaped_and_live_descendants() -> None:
    before = tree_cpu({"me": os.getpid()})["me"]
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while True:  # until the live child has burnt its share too
            cpu = tree_cpu({"parent": parent.pid})["parent"]
            if cpu.descendants_s >= 0.75 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # then both children's CPU is below the parent, and the parent's own is small
        assert 0.75 <= cpu.descendants_s < 2.0
        assert cpu.own_s < 0.5
        assert cpu.total_s == cpu.own_s + cpu.descendants_s
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the parent and its live child
        parent.wait()
    # a root that is gone reads as nothing; a difference is per part
    assert tree_cpu({"gone": parent.pid})["gone"] == TreeCPU(0.0, 0.0)
    assert (TreeCPU(2.0, 3.0) - TreeCPU(0.5, 1.0)) == TreeCPU(1.5, 2.0)
    assert tree_cpu({"me": os.getpid()})["me"].own_s >= before.own_s

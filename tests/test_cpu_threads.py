"""The CLI's thread count: the cores nobody else is using at start (``spectra_convert/cpu_threads.py``).

Measured with a real spinning process on the real /proc/stat, since what matters is that a process keeping a
core busy is seen and this process's own work is not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spectra_convert.cpu_threads import idle_cores, physical_cores, threads_for

CORES = os.sched_getaffinity(0)
PHYSICAL = physical_cores(CORES)
needs_two_cores = pytest.mark.skipif(PHYSICAL < 2, reason="needs two physical cores to leave one idle")


@contextmanager
def spinning_process() -> Iterator[None]:
    """Another process keeping one core busy, given a moment to start spinning."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


def test_threads_for_counts_a_mostly_busy_core_as_taken_and_keeps_one_thread() -> None:
    assert threads_for(2.0, 2) == 2
    assert threads_for(1.6, 2) == 2  # another process at 40% of a core: all threads stay
    assert threads_for(1.4, 2) == 1  # at 60%: the core is taken
    assert threads_for(0.0, 2) == 1  # never fewer than one thread
    assert threads_for(7.0, 4) == 4  # hyperthreads: never more than the physical cores


def test_physical_cores_reads_the_topology_of_the_allowed_cpus(tmp_path: Path) -> None:
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 1)):  # two cores with two hyperthreads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 2}, tmp_path) == 2
    assert physical_cores({0, 1}, tmp_path) == 1
    assert physical_cores({0, 7}, tmp_path) == 2  # cpu7's topology is missing: the logical count


@needs_two_cores
def test_idle_cores_sees_another_process_spinning() -> None:
    with spinning_process():
        idle = idle_cores(window=0.5)
    assert idle is not None and idle <= len(CORES) - 0.6


@needs_two_cores
def test_idle_cores_does_not_count_this_processes_own_work() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        idle = idle_cores(window=0.5)
    finally:
        stop.set()
        worker.join()
    assert idle is not None and idle >= len(CORES) - 0.5


def _cli_choice(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI entry's choice in a fresh interpreter (no torch imported yet), as a verb would start."""
    code = ("import os\nfrom spectra_convert.cli import _pick_threads\n_pick_threads(['validate', 'MODEL'])\n"
            "print(os.environ.get('OMP_NUM_THREADS', 'unset'))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


@needs_two_cores
def test_cli_runs_on_the_idle_cores_and_says_so_when_one_is_busy() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with spinning_process():
        busy = _cli_choice(env)
        chosen_by_user = _cli_choice({**env, "OMP_NUM_THREADS": "2"})
    assert busy.returncode == 0, busy.stderr
    assert busy.stdout.strip() == str(PHYSICAL - 1)
    assert "another process is keeping cores busy" in busy.stderr and "OMP_NUM_THREADS" in busy.stderr
    assert chosen_by_user.stdout.strip() == "2" and "note:" not in chosen_by_user.stderr


def test_cli_keeps_the_thread_count_of_a_process_that_already_imported_torch() -> None:
    """A library user or a test calling ``main`` in-process decided already: nothing changes, nothing printed."""
    code = ("import os, torch\nfrom spectra_convert.cpu_threads import choose_cli_threads\n"
            "env = {}\nprint(choose_cli_threads(env), env)")
    with spinning_process():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None {}"


def test_cli_leaves_the_thread_count_alone_when_every_core_is_idle() -> None:
    """On a quiet box torch keeps its own default (one thread a core) and nothing is printed."""
    idle = idle_cores(window=0.3)
    if idle is None or threads_for(idle, PHYSICAL) < PHYSICAL:
        pytest.skip("another process is using a core right now")
    quiet = _cli_choice({k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "unset" and "note:" not in quiet.stderr

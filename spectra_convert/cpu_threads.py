"""How many CPU threads a command-line run uses: the cores nobody else is using when it starts.

torch starts one intra-op thread per core. When another process already keeps a core busy, every parallel op
waits at its barrier for the thread whose core is taken, and a converted model runs more ops per layer than
its parent (router, dispatch), so it waits more often: on 2 cores with one busy, a SmolLM2 8x top-2 forward
took 3.1x its parent's time with 2 threads and 1.95x (its quiet ratio) with 1, and every model ran 2.7-4.4x
faster on 1 thread (docs/ARCHITECTURE.md, "Runtime speed"). So the CLI, before anything imports torch, looks at
how busy the cores it may run on were over a short window and sets ``OMP_NUM_THREADS`` to the idle ones.

It decides once, at start: contention that begins later is not followed. A user who sets ``OMP_NUM_THREADS``
decides alone, and a process that already imported torch (a library user, a test calling the CLI in-process)
keeps its own setting. Linux only (``/proc/stat``); elsewhere nothing changes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

#: Seconds between the two reads of the cores' counters: /proc/stat counts in 10 ms ticks, so 0.1 s gives
#: 10 ticks a core, enough to tell a spinning process (10 busy) from a quiet core (0-1).
SAMPLE_SECONDS = 0.1


def _core_ticks(cores: set[int], stat: Path) -> tuple[int, int] | None:
    """(busy, total) ticks summed over ``cores`` since boot, from /proc/stat's per-core lines."""
    busy = total = 0
    seen = 0
    for line in stat.read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        fields = [int(v) for v in rest.split()]
        # user nice system idle iowait irq softirq steal (guest time is already inside user / nice)
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        all_ticks = sum(fields[:8])
        busy += all_ticks - idle
        total += all_ticks
        seen += 1
    return (busy, total) if seen else None


def _own_ticks() -> float:
    """This process's CPU time in /proc/stat's ticks (all its threads)."""
    times = os.times()
    return (times.user + times.system) * os.sysconf("SC_CLK_TCK")


def idle_cores(window: float = SAMPLE_SECONDS, stat: Path = Path("/proc/stat")) -> float | None:
    """How many of the cores this process may run on were idle over ``window`` seconds, counting this
    process's own work as idle (it is the work the threads are for). None where /proc/stat is missing."""
    try:
        cores = os.sched_getaffinity(0)
        before, own_before = _core_ticks(cores, stat), _own_ticks()
        time.sleep(window)
        after, own_after = _core_ticks(cores, stat), _own_ticks()
    except (OSError, ValueError, AttributeError):
        return None
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = max(0.0, (after[0] - before[0]) - (own_after - own_before))
    return len(cores) * max(0.0, 1.0 - others / (after[1] - before[1]))


def physical_cores(cores: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct physical cores among the logical CPUs ``cores`` (torch's default thread count counts these,
    not hyperthreads); the logical count where sysfs does not say."""
    try:
        return len({((sysfs / f"cpu{c}/topology/physical_package_id").read_text().strip(),
                     (sysfs / f"cpu{c}/topology/core_id").read_text().strip()) for c in cores}) or len(cores)
    except OSError:
        return len(cores)


def threads_for(idle: float, physical: int) -> int:
    """Threads for ``idle`` idle logical CPUs on ``physical`` cores: a CPU another process keeps more than half
    busy counts as taken; never fewer than one thread, never more than the physical cores."""
    return max(1, min(physical, math.floor(idle + 0.5)))


def idle_core_threads() -> tuple[int, int]:
    """(threads for the cores idle now, physical cores): the pair the CLI decides by; both the physical count
    where the cores' counters cannot be read."""
    physical = physical_cores(os.sched_getaffinity(0))
    idle = idle_cores()
    return (physical if idle is None else threads_for(idle, physical)), physical


def choose_cli_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set ``OMP_NUM_THREADS`` in ``environ`` to the idle cores when fewer than all are idle, and return the
    count; None (nothing changed) when the user set it, torch is already imported, or the cores are idle."""
    if "OMP_NUM_THREADS" in environ or "torch" in sys.modules or not hasattr(os, "sched_getaffinity"):
        return None  # (no affinity call: not Linux, where /proc/stat is missing too)
    threads, physical = idle_core_threads()
    if threads >= physical:
        return None
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads

"""How many threads the engine's torch work uses: the CPUs this process may really run on (its
affinity and its cgroup's CPU quota), less the CPUs other processes keep busy when it starts.

torch's default is one thread per host core. On cores that other processes also use, or in a
container whose quota is below the host's core count, its OpenMP workers wait on each other at
every parallel region and each decode step stalls (issue 23: a 16-token completion took 24.5 s
beside busy processes with the default threads, 2.9 s with one). The CLI also sets
OMP_WAIT_POLICY=PASSIVE before torch loads (server/cli.py), so idle workers sleep instead of
spinning on cores someone else needs. A neighbour that starts later is seen too: `ThreadAdapter`
re-reads the load every `ADAPT_INTERVAL_S` between engine steps, from /proc/stat deltas (no
sleeping), and moves the count down or up (issue 23: a stream kept 0.38 of its quiet speed beside
a hog started after start-up). `cpu_threads` in EngineConfig (`--cpu-threads`) overrides the
choice and turns the adapting off.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
LOAD_SAMPLE_S = 0.25  # long enough to see a busy neighbour, short enough for start-up
ADAPT_INTERVAL_S = 1.0  # between load readings while the engine steps; a reading costs ~0.1 ms
STALE_WINDOW_S = 3 * ADAPT_INTERVAL_S  # a longer window (the engine sat idle) dilutes a new neighbour: re-read
HYSTERESIS = 0.2  # CPUs' worth past the rounding point before the count moves, so it does not flap


@dataclass(frozen=True)
class CpuBudget:
    """What the thread count was chosen from, for the start-up log."""

    affinity: int  # CPUs the scheduler may run this process on
    quota: float | None  # CPUs' worth of cgroup quota (None: no quota)
    busy: float  # CPUs' worth other processes used on those CPUs while measured (0 when not measured)
    threads: int
    requested: bool  # the operator gave the count (--cpu-threads)

    @property
    def usable(self) -> int:
        return usable_cpus(self.affinity, self.quota)

    def describe(self) -> str:
        source = "--cpu-threads" if self.requested else f"{self.usable} usable - {self.busy:.1f} busy"
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return (f"CPU threads: {self.threads} ({source}; affinity {self.affinity} CPUs, cgroup quota {quota}, "
                f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def usable_cpus(affinity: int, quota: float | None) -> int:
    """CPUs' worth this process can run on at once: its affinity, capped by a quota rounded up."""
    return max(1, min(affinity, math.ceil(quota)) if quota is not None else affinity)


def allowed_cpus() -> set[int]:
    return os.sched_getaffinity(0)


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota on this process's cgroup path (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), in CPUs."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            quotas += [_v2_quota(directory / "cpu.max") for directory in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):
            base = root / controllers if (root / controllers).is_dir() else root / "cpu"  # cpu or cpu,cpuacct
            quotas += [_v1_quota(directory) for directory in _ancestors(base, path)]
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/a/b/c, base/a/b, base/a, base: a limit on any of them binds this process."""
    parts = [part for part in path.strip("/").split("/") if part]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def _cpu_times(cpus: set[int], stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(busy, total) clock ticks summed over `cpus`, from /proc/stat."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [float(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


@dataclass
class _LoadReading:
    at: float  # time.monotonic()
    ticks: tuple[float, float]  # (busy, total) over the CPUs, from /proc/stat
    own_seconds: float  # this process's CPU time


def _read_load(cpus: set[int]) -> _LoadReading | None:
    ticks = _cpu_times(cpus)
    return None if ticks is None else _LoadReading(time.monotonic(), ticks, _own_cpu_seconds())


def _busy_between(before: _LoadReading, after: _LoadReading, num_cpus: int) -> float | None:
    """CPUs' worth that other processes kept busy between two readings (this process's own use excluded);
    None when no ticks passed."""
    total = after.ticks[1] - before.ticks[1]
    if total <= 0:
        return None
    share = (after.ticks[0] - before.ticks[0]) / total  # of all ticks on these CPUs
    own = (after.own_seconds - before.own_seconds) / (after.at - before.at)
    return max(0.0, share * num_cpus - own)


def busy_cpus(cpus: set[int], seconds: float = LOAD_SAMPLE_S) -> float:
    """CPUs' worth of `cpus` that other processes kept busy over `seconds` (this process's own use excluded)."""
    before = _read_load(cpus)
    time.sleep(seconds)
    after = _read_load(cpus)
    busy = None if before is None or after is None else _busy_between(before, after, len(cpus))
    return busy or 0.0


def adapted_threads(usable: int, busy: float, current: int) -> int:
    """The count for `busy` CPUs' worth of neighbours: `current` unless the free CPUs moved past its
    rounding point by more than HYSTERESIS, then the free CPUs rounded (1 to `usable`)."""
    free = usable - busy
    if current - 0.5 - HYSTERESIS < free < current + 0.5 + HYSTERESIS:
        return current
    return max(1, min(usable, round(free)))


class ThreadAdapter:
    """Follows the neighbours' load while the engine runs; `maybe_adjust` is called by the engine's own
    thread between steps (torch's OpenMP count is set from the thread that runs the parallel work)."""

    def __init__(self, budget: CpuBudget, cpus: set[int]) -> None:
        self.usable = budget.usable
        self.threads = budget.threads
        self.cpus = cpus
        self.last = _read_load(cpus)

    def maybe_adjust(self) -> int:
        """The thread count after this check: re-read only every ADAPT_INTERVAL_S, change torch's if needed."""
        if self.last is not None and time.monotonic() - self.last.at < ADAPT_INTERVAL_S:
            return self.threads
        previous, self.last = self.last, _read_load(self.cpus)
        if previous is None or self.last is None or self.last.at - previous.at > STALE_WINDOW_S:
            return self.threads
        busy = _busy_between(previous, self.last, len(self.cpus))
        if busy is None:
            return self.threads
        threads = adapted_threads(self.usable, busy, self.threads)
        if threads != self.threads:
            import torch

            torch.set_num_threads(threads)
            log.info("CPU threads: %d -> %d (%d usable - %.1f busy)", self.threads, threads, self.usable, busy)
            self.threads = threads
        return self.threads


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def choose_threads(requested: int | None = None, measure_load: bool = True) -> CpuBudget:
    """The thread count for this process's torch work: `requested`, else usable CPUs less busy ones (at least 1)."""
    cpus = allowed_cpus()
    quota = cgroup_quota()
    usable = usable_cpus(len(cpus), quota)
    if requested is not None:
        return CpuBudget(len(cpus), quota, 0.0, requested, requested=True)
    busy = busy_cpus(cpus) if measure_load and usable > 1 else 0.0
    return CpuBudget(len(cpus), quota, busy, max(1, usable - round(busy)), requested=False)


def apply_cpu_threads(requested: int | None = None) -> ThreadAdapter | None:
    """Choose the thread count, give it to torch, and log why; the adapter that follows the load from
    then on (None: the operator chose the count, or there is one CPU to use)."""
    import torch

    budget = choose_threads(requested)
    torch.set_num_threads(budget.threads)
    log.info(budget.describe())
    return None if budget.requested or budget.usable == 1 else ThreadAdapter(budget, allowed_cpus())

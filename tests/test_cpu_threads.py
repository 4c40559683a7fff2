"""engine/cpu_threads.py: the thread count follows affinity, cgroup quota and busy neighbours; --cpu-threads wins."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import cpu_threads
from engine.config import ConfigError, EngineConfig
from server.cli import build_parser
from server.engine_args import engine_config


def write_cgroup_v2(tmp_path: Path, quotas: dict[str, str]) -> tuple[Path, Path]:
    """A fake v2 hierarchy: /proc/self/cgroup points at a/b; `quotas` maps a directory to its cpu.max."""
    root = tmp_path / "cgroup"
    for directory, quota in quotas.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "cpu.max").write_text(quota + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/a/b\n")
    return root, proc


def test_v2_quota_is_the_tightest_on_the_path(tmp_path):
    root, proc = write_cgroup_v2(tmp_path, {"": "max 100000", "a": "300000 100000", "a/b": "150000 100000"})
    assert cpu_threads.cgroup_quota(root, proc) == 1.5
    root, proc = write_cgroup_v2(tmp_path / "x", {"a": "50000 100000", "a/b": "max 100000"})
    assert cpu_threads.cgroup_quota(root, proc) == 0.5


def test_no_quota_anywhere(tmp_path):
    root, proc = write_cgroup_v2(tmp_path, {"a/b": "max 100000"})
    assert cpu_threads.cgroup_quota(root, proc) is None
    assert cpu_threads.cgroup_quota(root, tmp_path / "missing") is None


def test_v1_quota(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu,cpuacct" / "pod").mkdir(parents=True)
    (root / "cpu,cpuacct" / "pod" / "cpu.cfs_quota_us").write_text("200000\n")
    (root / "cpu,cpuacct" / "pod" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/pod\n3:cpu,cpuacct:/pod\n0::/\n")
    assert cpu_threads.cgroup_quota(root, proc) == 2.0


@pytest.mark.parametrize("affinity, quota, usable", [(8, None, 8), (8, 2.0, 2), (8, 1.5, 2), (2, 0.2, 1), (4, 16.0, 4)])
def test_usable_cpus(affinity, quota, usable):
    assert cpu_threads.usable_cpus(affinity, quota) == usable


def test_busy_neighbours_take_threads(monkeypatch):
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus: 2.2)
    assert cpu_threads.choose_threads().threads == 2
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus: 7.0)
    assert cpu_threads.choose_threads().threads == 1  # never none
    monkeypatch.setattr(cpu_threads, "cgroup_quota", lambda: 3.0)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus: 0.1)
    budget = cpu_threads.choose_threads()
    assert budget.threads == 3 and "cgroup quota 3 CPUs" in budget.describe()
    requested = cpu_threads.choose_threads(requested=5)
    assert requested.threads == 5 and requested.requested and "--cpu-threads" in requested.describe()


def test_busy_cpus_sees_another_process():
    """A spinning neighbour on one of our CPUs reads as (most of) one busy CPU."""
    cpus = {sorted(cpu_threads.allowed_cpus())[0]}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        time.sleep(0.3)
        assert cpu_threads.busy_cpus(cpus, seconds=0.5) > 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_cpu_threads_flag_and_config():
    args = build_parser().parse_args(["serve", "--cpu-threads", "3"])
    assert engine_config(args, None, None).cpu_threads == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cpu-threads", "0"])
    with pytest.raises(ConfigError, match="cpu_threads"):
        EngineConfig(cpu_threads=0)


def test_cli_sets_passive_wait_policy_before_torch():
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import server.cli; "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["PASSIVE", "False"]


def test_engine_applies_the_count_and_logs_it(tmp_path, caplog):
    import torch

    from engine.builder import build_engine
    from server_fixtures import save_tiny_llama

    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="engine.cpu_threads"):
            build_engine(EngineConfig(model=str(save_tiny_llama(tmp_path / "m")), device="cpu",
                                               kernel_backend="torch", kv_cache_gib=0.01, cpu_threads=1))
        assert torch.get_num_threads() == 1
        assert "CPU threads: 1 (--cpu-threads" in caplog.text
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("usable, busy, current, expected", [
    (4, 0.0, 4, 4),  # quiet: all of them
    (4, 1.0, 4, 3),  # a neighbour started: one fewer
    (4, 2.6, 4, 1),  # most taken: free CPUs rounded
    (4, 5.0, 2, 1),  # never none
    (4, 0.6, 4, 4),  # within the hysteresis: no flapping around the rounding point
    (4, 0.8, 4, 3),
    (4, 1.6, 3, 3),
    (4, 0.0, 1, 4),  # the neighbour left: back up
    (2, 0.2, 1, 2),
    (2, 0.4, 1, 1),
])
def test_adapted_threads(usable, busy, current, expected):
    assert cpu_threads.adapted_threads(usable, busy, current) == expected


class FakeLoad:
    """/proc/stat ticks and clocks that a test moves by hand (100 ticks a second per CPU)."""

    def __init__(self, monkeypatch, cpus: int) -> None:
        self.now, self.busy_ticks, self.total_ticks, self.own = 100.0, 0.0, 0.0, 0.0
        self.cpus = cpus
        monkeypatch.setattr(cpu_threads, "_cpu_times", lambda cpus: (self.busy_ticks, self.total_ticks))
        monkeypatch.setattr(cpu_threads, "_own_cpu_seconds", lambda: self.own)
        monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: self.now)

    def run(self, seconds: float, others_busy: float, own_busy: float) -> None:
        self.now += seconds
        self.total_ticks += 100 * seconds * self.cpus
        self.busy_ticks += 100 * seconds * (others_busy + own_busy)
        self.own += seconds * own_busy


def test_adapter_follows_a_neighbour_that_starts_later(monkeypatch, caplog):
    import torch

    load = FakeLoad(monkeypatch, cpus=4)
    set_threads = []
    monkeypatch.setattr(torch, "set_num_threads", set_threads.append)
    adapter = cpu_threads.ThreadAdapter(cpu_threads.CpuBudget(4, None, 0.0, 4, requested=False), {0, 1, 2, 3})
    load.run(0.5, others_busy=2.0, own_busy=2.0)
    assert adapter.maybe_adjust() == 4 and set_threads == []  # not read again before ADAPT_INTERVAL_S
    load.run(cpu_threads.ADAPT_INTERVAL_S, others_busy=2.0, own_busy=2.0)
    with caplog.at_level("INFO", logger="engine.cpu_threads"):
        assert adapter.maybe_adjust() == 2
    assert set_threads == [2] and "CPU threads: 4 -> 2" in caplog.text
    load.run(cpu_threads.ADAPT_INTERVAL_S, others_busy=2.0, own_busy=2.0)
    assert adapter.maybe_adjust() == 2 and set_threads == [2]  # our own use is not a neighbour's
    load.run(cpu_threads.STALE_WINDOW_S + 1, others_busy=0.0, own_busy=0.0)
    assert adapter.maybe_adjust() == 2  # a window that long (idle engine) is only a new baseline
    load.run(cpu_threads.ADAPT_INTERVAL_S, others_busy=0.0, own_busy=2.0)
    assert adapter.maybe_adjust() == 4 and set_threads == [2, 4]


def test_no_adapting_when_the_operator_chose(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    monkeypatch.setattr(cpu_threads, "allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpu_threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda cpus: 0.0)
    assert cpu_threads.apply_cpu_threads(requested=2) is None
    adapter = cpu_threads.apply_cpu_threads()
    assert isinstance(adapter, cpu_threads.ThreadAdapter) and adapter.threads == 4

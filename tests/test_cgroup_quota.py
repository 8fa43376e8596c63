"""The torch thread count honours a cgroup CPU quota (``docker run --cpus``): hand-made cgroup files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from elgs import compute
from elgs.compute import ComputeThread, cgroup_cpu_quota


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.fixture
def cgroup(tmp_path: Path) -> tuple[Path, Path]:
    """An empty cgroup mount point and a /proc/self/cgroup naming the root cgroup (as inside a container)."""
    root, proc = tmp_path / "sys/fs/cgroup", tmp_path / "proc_self_cgroup"
    root.mkdir(parents=True)
    write(proc, "0::/")
    return root, proc


@pytest.mark.parametrize(("cpu_max", "cores"), [
    ("150000 100000", 1.5),   # docker run --cpus=1.5
    ("100000 100000", 1.0),
    ("50000 100000", 0.5),
    ("max 100000", None),     # no quota
    ("max", None),
    ("garbage", None),
    ("", None),
])
def test_cgroup_v2_cpu_max(cgroup, cpu_max, cores):
    root, proc = cgroup
    write(root / "cpu.max", cpu_max)
    assert cgroup_cpu_quota(root, proc) == cores


@pytest.mark.parametrize("controllers", ["cpu", "cpu,cpuacct"])
@pytest.mark.parametrize(("quota", "period", "cores"), [("100000", "100000", 1.0), ("250000", "100000", 2.5),
                                                        ("-1", "100000", None), ("100000", "0", None)])
def test_cgroup_v1_cfs_quota(cgroup, controllers, quota, period, cores):
    """Docker on a cgroup v1 host mounts the container's cpu cgroup at /sys/fs/cgroup/cpu (or cpu,cpuacct),
    while /proc/self/cgroup still names the host's path, which does not exist inside."""
    root, proc = cgroup
    write(proc, f"4:{controllers}:/docker/0123abcd\n2:cpuacct:/docker/0123abcd\n0::/")
    write(root / controllers / "cpu.cfs_quota_us", quota)
    write(root / controllers / "cpu.cfs_period_us", period)
    assert cgroup_cpu_quota(root, proc) == cores


def test_the_smallest_quota_of_the_cgroup_and_its_parents_wins(cgroup):
    """A host process in a systemd slice: the parent's quota limits the child too."""
    root, proc = cgroup
    write(proc, "0::/user.slice/job.scope")
    write(root / "user.slice" / "cpu.max", "200000 100000")
    write(root / "user.slice" / "job.scope" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, proc) == 2.0
    write(root / "user.slice" / "job.scope" / "cpu.max", "120000 100000")
    assert cgroup_cpu_quota(root, proc) == 1.2


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing_proc") is None
    assert cgroup_cpu_quota(tmp_path, tmp_path) is None  # a directory where a file is expected


@pytest.mark.parametrize(("affinity", "quota", "cores"), [(8, None, 8), (8, 1.0, 1), (8, 2.5, 2), (8, 0.2, 1),
                                                          (2, 4.0, 2)])
def test_available_cores_is_the_affinity_capped_by_the_quota_rounded_down(monkeypatch, affinity, quota, cores):
    monkeypatch.setattr(compute.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(compute, "cgroup_cpu_quota", lambda: quota)
    assert compute.available_cores() == cores


def test_a_compute_thread_runs_and_logs_the_quota_thread_count(monkeypatch, caplog):
    """The server's log says how many torch threads each model gets and why (`docker run --cpus=1`: 1)."""
    import torch

    monkeypatch.delenv("ELGS_TORCH_THREADS", raising=False)
    monkeypatch.setattr(compute.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(compute, "cgroup_cpu_quota", lambda: 1.0)
    with caplog.at_level(logging.INFO, logger="elgs.compute"):
        thread = ComputeThread("quota-test")
    try:
        assert thread.threads == 1 and thread.call(torch.get_num_threads) == 1
    finally:
        thread.shutdown()
    assert "elgs-compute-quota-test: 1 torch thread (4 cores, cgroup CPU quota 1.00)" in caplog.text

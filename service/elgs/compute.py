"""Where a model's torch ops run: one compute thread per model, and the torch thread count.

Measured on a 2-core machine (issue 8, benchmarks/placement.py): a model loaded and run in one
single thread runs at full speed, but once a second thread has run torch ops (loading the model in
the main thread, converting images to tensors or PNGs on helper threads) both threads own an
OpenMP team, the teams fight over the cores and every pass takes about twice as long. So the
service gives each model one :class:`ComputeThread` that loads it, converts its inputs and outputs
and runs both passes; the event loop and helper threads touch only bytes, Pillow and NumPy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)

COMPUTE_THREAD_PREFIX = "elgs-compute"


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask (``os.cpu_count()`` where unknown), capped by
    a cgroup CPU quota (``docker run --cpus``, a Kubernetes CPU limit) rounded down, at least 1.

    Rounded down because OpenMP threads beyond the quota are throttled in the middle of a parallel
    region and the whole team waits for them (``--cpus=1.5`` runs 1 thread, not 2).
    """
    quota = cgroup_cpu_quota()
    return _affinity_cores() if quota is None else min(_affinity_cores(), max(1, math.floor(quota)))


def describe_cores() -> str:
    """Where :func:`available_cores` comes from, for the log: ``"2 cores, cgroup CPU quota 1.00"``."""
    quota = cgroup_cpu_quota()
    return f"{_affinity_cores()} cores, " + ("no cgroup CPU quota" if quota is None else f"cgroup CPU quota {quota:.2f}")


def _affinity_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (``docker run --cpus=1.5``: 1.5), None without one.

    Reads cgroup v2's ``cpu.max`` (``"150000 100000"``; ``"max 100000"`` is no quota) or v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (a quota of -1 is none) in the process's cgroup (from
    ``proc_cgroup``), each of its parents, and the mount point itself, which inside a container is the
    container's own cgroup. The smallest quota found wins; unreadable or malformed files count as none.
    """
    quotas = [quota for directory in _cgroup_dirs(root, proc_cgroup) if (quota := _cpu_quota_in(directory))]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup directories that may hold this process's CPU quota, under v2's and v1's mount points."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths = []
    for line in lines:  # "0::/user.slice/x.scope" (v2), "4:cpu,cpuacct:/docker/ID" (v1)
        fields = line.split(":", 2)
        if len(fields) == 3 and (fields[1] == "" or "cpu" in fields[1].split(",")):
            path = PurePosixPath(fields[2])
            paths += [part.relative_to("/") for part in (path, *path.parents) if part.is_absolute()]
    mounts = (root, root / "cpu", root / "cpu,cpuacct")
    return list(dict.fromkeys(mount / path for mount in mounts for path in (*paths, PurePosixPath("."))))


def _cpu_quota_in(directory: Path) -> float | None:
    """The quota in cores of one cgroup directory (v2 ``cpu.max`` first, then v1), None without one."""
    try:
        quota, period = ((directory / "cpu.max").read_text().split() + ["100000"])[:2]
        return None if quota == "max" else _positive_ratio(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:
        return _positive_ratio(int((directory / "cpu.cfs_quota_us").read_text()),
                               int((directory / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        return None


def _positive_ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def torch_threads(threads: int | None = None) -> int:
    """The intra-op thread count to use: ``threads`` (the ``torch_threads`` setting, ``$ELGS_TORCH_THREADS``,
    which the CLI and the app pass down), else :func:`available_cores` (the affinity mask capped by a cgroup
    CPU quota).

    Raises:
        ValueError: the value is not a positive integer.
    """
    if threads is None:
        return available_cores()
    if threads < 1:
        raise ValueError(f"torch threads must be >= 1, got {threads}")
    return threads


def set_torch_threads(threads: int | None = None) -> int:
    """Apply :func:`torch_threads` with ``torch.set_num_threads`` in the calling thread; returns it.

    The CLI and the attack tools call it in their main thread, the service in each compute thread.
    """
    import torch

    threads = torch_threads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_allocator_tuned: bool | None = None


def tune_allocator(enabled: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for the next pass instead of handing it back to the OS.

    By default glibc serves every allocation over 32 MiB (and, in threads other than the main one, many
    smaller ones) with a fresh ``mmap`` and unmaps it on free, so each model pass page-faults its
    activations in again: measured on the 2-core machine, an EfficientNet-Lite0 ``/defend/slgs``
    request (SmoothGrad n=8) spent 100-240 ms of its 600-900 CPU ms in the kernel, about 100,000 page
    faults. This sets, process-wide: one arena (``M_ARENA_MAX=1``: the compute thread allocates like the
    main thread), no ``mmap`` for allocations (``M_MMAP_MAX=0``), free memory at the top of the heap
    returned to the OS only above 1 GiB (``M_TRIM_THRESHOLD``) and 64 MiB of headroom per heap growth
    (``M_TOP_PAD``). Measured: the same request 360-420 ms -> 293 ms in a compute thread, page faults
    ~0. The price: the process keeps up to 1 GiB of freed memory (reused by the next pass or decode).

    Call it while the process has one thread (the CLI does, first thing; :func:`elgs.api.create_app` does
    too): glibc fixes the number of arenas when a second thread first allocates, after which a compute
    thread gets an arena of its own whose large blocks are still mapped and unmapped on every pass.

    Args:
        enabled: the ``malloc_tuning`` setting (``ELGS_MALLOC_TUNING``, default on), which the CLI and the app
            pass down.

    Returns:
        whether the tuning is in effect (False on a libc other than glibc, or when disabled). The first call
        decides for the process (malloc's arenas are fixed by then, which is why the record is process-wide);
        later calls return that decision.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    if not enabled:
        _allocator_tuned = False
        return False
    import ctypes
    import platform

    _allocator_tuned = False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    arenas = malloc_arenas(libc)
    if arenas > 1:
        logger.warning("malloc tuned after other threads allocated (%d arenas): a compute thread may get an "
                       "arena whose large blocks are still unmapped after every pass; tune earlier, or start "
                       "the process with MALLOC_ARENA_MAX=1", arenas)
    results = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0),
               libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30), libc.mallopt(_M_TOP_PAD, 64 << 20)]
    _allocator_tuned = all(result == 1 for result in results)
    return _allocator_tuned


def malloc_arenas(libc=None) -> int:
    """How many malloc arenas glibc has made so far (``malloc_info``'s heaps); 0 where unknown."""
    import ctypes

    try:
        libc = libc or ctypes.CDLL("libc.so.6")
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return 0
    buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return 0
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    text = ctypes.string_at(buffer, size.value).decode("ascii", "replace")
    libc.free(ctypes.cast(buffer, ctypes.c_void_p))
    return text.count("<heap nr=")


class ComputeThread:
    """One thread that runs every torch op of one model (loading included), one call at a time.

    Args:
        name: suffix of the thread's name (``elgs-compute-<name>``), usually the model's name.
        threads: torch intra-op threads, set in the thread before its first call (None:
            :func:`torch_threads`).

    Example:
        >>> compute = ComputeThread("efficientnet_lite0")
        >>> model = compute.call(load_model, "efficientnet_lite0")
        >>> logits = await compute.run(model.module, x)
        >>> compute.shutdown()
    """

    def __init__(self, name: str, threads: int | None = None) -> None:
        self.name = f"{COMPUTE_THREAD_PREFIX}-{name}"
        self.threads = torch_threads(threads)
        source = describe_cores() if threads is None else "set by ELGS_TORCH_THREADS"
        logger.info("%s: %d torch thread%s (%s)", self.name, self.threads, "" if self.threads == 1 else "s", source)
        tune_allocator()  # before the thread's first allocation
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name,
                                            initializer=set_torch_threads, initargs=(self.threads,))
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
        """Queue ``fn(*args, **kwargs)`` on the thread; a concurrent future of its result."""
        return self._executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the thread and wait for it (blocking; not from the event loop)."""
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the thread; the event loop stays free meanwhile."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the thread once its current call is done; calls still queued are cancelled."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)

    @staticmethod
    def is_compute_thread(thread: threading.Thread | None = None) -> bool:
        """Whether ``thread`` (default: the calling one) is a compute thread."""
        return (thread or threading.current_thread()).name.startswith(COMPUTE_THREAD_PREFIX)

"""Process set-up shared by the torch stages: device, threads, seeds, determinism, allocator."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import resource
import sys

import numpy as np
import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def tune_allocator() -> None:
    """Keep freed activation buffers in glibc's heap for the next step (docs/training.md, "Memory")."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def release_free_memory() -> None:
    """Give the heap's free memory back to the kernel (``malloc_trim``) between phases whose tensors differ."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def queue_workers() -> int:
    """How many DVC queue workers run experiments beside this one (`dvc queue start -j N`: N); 1 outside a queue
    (docs/training.md, "Threads")."""
    if f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}" not in os.getcwd() + os.sep:
        return 1
    import psutil

    workers = 0
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            workers += "queue-worker" in process.info["cmdline"]
    return max(1, workers)


def default_threads(processes: int = 1) -> int:
    """Threads per process when params say null: this process's share of the usable cores."""
    return max(1, usable_cores() // (processes * queue_workers()))


def available_memory() -> int | None:
    """Bytes a new allocation can take now: the GPU's free memory, or MemAvailable (None where unknown)."""
    try:
        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
    except (RuntimeError, AssertionError):  # CUDA present but unusable here: let the run say so itself
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def setup(seed: int, threads: int | None = None) -> torch.device:
    """Seed everything, make CPU kernels deterministic, and return the device to run on; ``threads`` (None: one
    per usable core) changes how reductions split, hence the results' last bits."""
    tune_allocator()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(threads or default_threads())
    if device.type == "cpu":
        with contextlib.suppress(RuntimeError):  # already fixed by earlier torch work in this process
            torch.set_num_interop_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # no kernel here reads memory it never wrote
        torch.set_flush_denormal(True)  # denormals take x86's slow microcode path
    else:  # bilinear upsampling's backward has no deterministic CUDA kernel: a GPU trades bit-exactness for speed
        torch.backends.cudnn.benchmark = True
    return device


# Vector extensions that decide which kernels oneDNN and torch pick, best first (names as in /proc/cpuinfo).
_X86_ISAS = ("amx_tile", "avx512_bf16", "avx512f", "avx2", "avx", "sse4_2")


def cpu_isa() -> str:
    """The best vector extension of this CPU (/proc/cpuinfo's flags), or the machine's architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux
        flags = []
    return next((isa for isa in _X86_ISAS if isa in flags), platform.machine())


def describe(device: torch.device) -> dict:
    """What decides the arithmetic of a run besides its params: recorded beside the metrics of a training."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_isa": cpu_isa(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Process set-up shared by the torch stages: device, threads, seeds, determinism, allocator."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import resource
import sys

import numpy as np
import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Stop glibc from unmapping and re-mapping the large activation buffers on every step.

    By default each tensor above the mmap threshold gets fresh pages from the kernel and returns them on
    free, so every training step pays page faults for all its activations. Raising both thresholds keeps
    freed memory in the heap for the next step (measured here: +15 % training at batch 64, +40-80 %
    inference, for a higher peak RSS).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def release_free_memory() -> None:
    """Give the heap's free memory back to the kernel (glibc's ``malloc_trim``), between phases whose tensors
    differ: with the thresholds above, a training epoch's buffers and then a validation pass over large images
    would otherwise both stay resident (2.2 GB peak for a 2048 x 1024 validation image at width 8 against 1.4
    GB for either alone). Costs one round of page faults at the next phase's start."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset and container limits narrow)."""
    return len(os.sched_getaffinity(0))


def available_memory() -> int | None:
    """Bytes a new allocation can take now: the GPU's free memory, or the kernel's MemAvailable (None where
    /proc/meminfo is not there to say)."""
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
    """Seed everything, make CPU kernels deterministic, and return the device to run on.

    ``threads``: torch's intra-op threads; None for one per usable core. The count changes how reductions
    are split, hence the last bits of the results (seen on the tiny test configuration: 1 and 2 threads
    train different weights).
    """
    tune_allocator()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # One intra-op thread per core we may use; inter-op parallelism only oversubscribes a small machine.
    torch.set_num_threads(threads or usable_cores())
    if device.type == "cpu":
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already fixed by earlier torch work in this process (tests calling stages)
            pass
        torch.use_deterministic_algorithms(True)
        # Deterministic mode also fills every new tensor with NaN, a debugging aid for kernels that read
        # memory they never wrote; no kernel here does, and the fill took 3 % of a training step.
        torch.utils.deterministic.fill_uninitialized_memory = False
        # Gradients that underflow (very confident logits, long runs) become denormal floats, which x86 CPUs
        # handle in a slow microcode path. The default runs were measured not to hit it; flushing costs nothing.
        torch.set_flush_denormal(True)
    else:
        # Bilinear upsampling's backward has no deterministic CUDA kernel; on a GPU we trade bit-exactness
        # for speed and say so in the README.
        torch.backends.cudnn.benchmark = True
    return device


# Vector extensions that decide which kernels oneDNN and torch pick, best first (names as in /proc/cpuinfo).
_X86_ISAS = ("amx_tile", "avx512_bf16", "avx512f", "avx2", "avx", "sse4_2")


def cpu_isa() -> str:
    """The best vector extension of this CPU (from /proc/cpuinfo's flags), or the machine's architecture."""
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

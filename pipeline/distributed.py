"""Data-parallel training with torch.distributed: launching N processes, joining a run, what the ranks share.

Each rank holds a replica (DistributedDataParallel: gloo on CPUs, NCCL on GPUs) and takes a contiguous part of
every global batch (:func:`shard`); batch norm and the loss are over the global batch. A rank that lost a peer
exits with ``PEER_FAILED``. Details and reasons: docs/training.md, "Several processes".
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.stage import StageError

TIMEOUT_ENV = "SEGPIPE_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600  # longer than anything a rank does between two collectives (rank 0 writing the state)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
PEER_FAILED = 3  # exit status of a rank that stopped because another one failed (or hung) in a collective
# How gloo reports a peer that died or never answered (plain RuntimeErrors); NCCL raises torch.distributed.DistError.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out")


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def local_world_size() -> int:
    """Processes of this run on this machine (1 outside torchrun): they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1


@contextlib.contextmanager
def stop_on_peer_failure(group: Group | None, who: str) -> Iterator[None]:
    """A collective that failed because another rank died or hung ends this rank with one line and exit status
    ``PEER_FAILED``, so that the launcher names the cause."""
    try:
        yield
    except Exception as e:
        lost = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_LOST))
        if group is None or not lost:
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        message = f"{who}: rank {group.rank}: stopped, another rank failed or hung ({first_line})"
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(PEER_FAILED) from None


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items, as ``numpy.array_split`` splits them."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def launch(dataset: str, processes: int, module: str = "pipeline.train") -> str:
    """Run ``python -m <module> <dataset>`` as ``processes`` workers on this machine (torchrun --standalone's
    elastic launcher, no restarts) and wait for them."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="segpipe-launch-") as logs:  # the agent's per-run files
        nodes = dict(min_nodes=1, max_nodes=1, nproc_per_node=processes, max_restarts=0, monitor_interval=0.1)
        rendezvous = dict(run_id=str(uuid.uuid4()), rdzv_backend="c10d", rdzv_endpoint="localhost:0")
        config = LaunchConfig(**nodes, **rendezvous, logs_specs=DefaultLogsSpecs(log_dir=logs))
        try:
            elastic_launch(config, sys.executable)("-m", module, dataset)
        except SignalException as e:  # the agent has passed the signal on; the workers saved what they had
            raise SystemExit(128 + int(e.sigval)) from None
        except ChildFailedError as e:
            raise _launch_failure(e, processes) from None
    return f"{processes} processes done"


def _launch_failure(e, processes: int) -> BaseException:
    """What ends a launch whose workers failed: the rank that failed first of its own accord names the cause."""
    failures = e.failures
    stopped = {128 + signal.SIGINT, 128 + signal.SIGTERM}
    statuses = {failure.exitcode for failure in failures.values()}
    if statuses <= stopped:  # a signal sent to workers directly: they stopped cleanly, together
        return SystemExit(max(statuses))
    # Not the bystanders that lost a peer or that the agent stopped with SIGTERM.
    errors = {r: f for r, f in failures.items() if f.exitcode > 0 and f.exitcode not in stopped | {PEER_FAILED}}
    causes = errors or {r: f for r, f in failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
    if not causes:
        return StageError(
            f"ranks {sorted(failures)} of {processes} lost a peer in a collective and no rank "
            f"reported an error of its own: one hung or was killed (see above)"
        )
    rank = min(causes, key=lambda r: (causes[r].timestamp, r))
    failure = causes[rank]
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with status {failure.exitcode}"
    return StageError(f"rank {rank} of {processes} {how} (its error is above); the other ranks were stopped")


@dataclass
class Group:
    """This process's place in a data-parallel run of ``world`` processes (world >= 2)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup | None  # CPU (gloo) group for decisions; None: the default group is gloo already

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def agree(self, pending: int | None) -> int | None:
        """The largest of the ranks' ``pending`` signal numbers (None where none is)."""
        flag = torch.tensor([pending or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item()) or None

    def broadcast(self, obj):
        """Rank 0's ``obj`` (picklable, tensors on the CPU), on every rank."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def close(self) -> None:
        dist.destroy_process_group()


def join(device: torch.device) -> tuple[Group | None, torch.device]:
    """Join the run torchrun started, if it has several processes: the group (None otherwise) and this rank's
    device (its own GPU, by local rank)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None, device
    if sys.platform.startswith("linux"):  # SIGTERM when the launcher dies: workers have sessions of their own
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise StageError(f"${TIMEOUT_ENV}: must be a positive number of seconds, got {raw!r}")
    timeout = datetime.timedelta(seconds=seconds)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = None
    return Group(rank, world, local_rank, device, control), device


class _SumOverRanks(torch.autograd.Function):
    """A differentiable all-reduce (sum), its backward one of the gradient; torch.distributed.nn's is deprecated."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.forward(ctx, grad)


sum_over_ranks = _SumOverRanks.apply


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks, on CPUs too (where torch's
    SyncBatchNorm has no kernels); the state dict is BatchNorm2d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], (0, 2, 3)
        xf = x.float()
        total = sum_over_ranks(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // channels)]))
        count = total[channels]
        mean = total[:channels] / count
        centred = xf - mean.view(1, channels, 1, 1)
        var = sum_over_ranks(centred.square().sum(dims)) / count  # biased, as the normalisation uses
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps).view(1, channels, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, channels, 1, 1) + self.bias.view(1, channels, 1, 1)
        return y.to(x.dtype)


def synchronize_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm2d computing global-batch statistics; the same parameters and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if type(model) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats)
        if model.affine:
            new.weight, new.bias = model.weight, model.bias
        if model.track_running_stats:
            new.running_mean, new.running_var = model.running_mean, model.running_var
            new.num_batches_tracked = model.num_batches_tracked
        return new.train(model.training)
    for name, child in model.named_children():
        model.add_module(name, synchronize_batchnorm(child, device))
    return model

"""Data-parallel training with torch.distributed: launching N processes, joining a run, what the ranks share.

``processes: N > 1`` re-launches the stage under torch's elastic launcher (:func:`launch`, what ``torchrun
--standalone`` does); a process torchrun started joins instead (:func:`join`). Each rank holds a model replica
(DistributedDataParallel, gloo on CPUs, NCCL on GPUs) and takes a contiguous part of every global batch
(:func:`shard`); batch-norm statistics (:class:`GlobalBatchNorm2d` on CPUs) and the loss are over the global
batch. A rank that fails ends the run with its own error, named by :func:`launch`; a rank that lost a peer exits
with ``PEER_FAILED``. Details and the reasons: docs/training.md, "Several processes".
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


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0
    if not seconds > 0:
        raise StageError(f"${TIMEOUT_ENV}: must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or hung."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(marker in str(error) for marker in _PEER_LOST)
    )


@contextlib.contextmanager
def stop_on_peer_failure(group: Group | None, who: str) -> Iterator[None]:
    """Within the block, a collective that failed because another rank died or hung ends this rank with one line
    (``<who>: rank <r>: stopped, ...``) and exit status ``PEER_FAILED``, so that the launcher names the cause."""
    try:
        yield
    except Exception as e:
        if group is None or not peer_failure(e):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(
            f"{who}: rank {group.rank}: stopped, another rank failed or hung ({first_line})",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(PEER_FAILED) from None


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items: sizes differ by at most one, the first ranks larger
    (``numpy.array_split``'s split); concatenated in rank order, the parts are the ``n`` items in order."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


# ------------------------------------------------------------------------------------------ launching


def launch(dataset: str, processes: int, module: str = "pipeline.train") -> str:
    """Run ``python -m <module> <dataset>`` as ``processes`` workers on this machine and wait for them.

    torch's own elastic launcher (the API behind ``torchrun --standalone``): a c10d rendezvous on a free
    local port, no restarts (a failed training resumes from its state when the stage is run again, not
    halfway through an epoch). Workers write to this process's stdout and stderr.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="segpipe-launch-") as logs:  # the agent's per-run files
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", module, dataset)
        except SignalException as e:  # the agent has passed the signal on; the workers saved what they had
            raise SystemExit(128 + int(e.sigval)) from None
        except ChildFailedError as e:
            statuses = {failure.exitcode for failure in e.failures.values()}
            stopped = {128 + signal.SIGINT, 128 + signal.SIGTERM}
            if statuses <= stopped:  # a signal sent to workers directly: they stopped cleanly, together
                raise SystemExit(max(statuses)) from None
            # The cause: a rank that exited with an error of its own, else one killed by a signal the agent did
            # not send (the OOM killer's SIGKILL, a segfault); not the bystanders that lost a peer or that the
            # agent stopped with SIGTERM.
            errors = {
                r: f for r, f in e.failures.items() if f.exitcode > 0 and f.exitcode not in stopped | {PEER_FAILED}
            }
            killed = {r: f for r, f in e.failures.items() if f.exitcode < 0 and f.exitcode != -signal.SIGTERM}
            causes = errors or killed
            if not causes:
                raise StageError(
                    f"ranks {sorted(e.failures)} of {processes} lost a peer in a collective and no rank "
                    f"reported an error of its own: one hung or was killed (see above)"
                ) from None
            rank = min(causes, key=lambda r: (causes[r].timestamp, r))
            failure = causes[rank]
            how = (
                f"was killed by {failure.signal_name()}"
                if failure.exitcode < 0
                else f"exited with status {failure.exitcode}"
            )
            raise StageError(
                f"rank {rank} of {processes} {how} (its error is above); the other ranks were stopped"
            ) from None
    return f"{processes} processes done"


def _die_with_parent() -> None:
    """SIGTERM this process when the process that started it dies (Linux): torchrun's workers have sessions
    of their own, so a launcher killed by SIGKILL would otherwise leave them training on."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------ the process group


@dataclass
class Group:
    """This process's place in a data-parallel run of ``world`` processes (world >= 2)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: dist.ProcessGroup | None  # CPU (gloo) group for decisions; None: the default group is gloo already

    @property
    def main(self) -> bool:
        """Rank 0, the one that prints and writes."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (on this rank's device) over the ranks, in place; returns it."""
        dist.all_reduce(tensor)
        return tensor

    def agree(self, pending: int | None) -> int | None:
        """The largest of the ranks' ``pending`` signal numbers (None where none is): one small CPU collective."""
        flag = torch.tensor([pending or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item()) or None

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable, tensors on the CPU), on every rank."""
        box = [obj if self.main else None]
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
    """Join the run torchrun started, if any, with more than one process; returns the group (None when this
    is a one-process run) and the device this rank computes on (its own GPU, by local rank)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None, device
    _die_with_parent()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = collective_timeout()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control = None
    return Group(rank, world, local_rank, device, control), device


# ------------------------------------------------------------------------------------------ global batch norm


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: every rank's output is the same global sum,
    so the gradient of a value computed from it on every rank is the sum of the ranks' gradients.

    (torch.distributed.nn.functional.all_reduce does the same, and is deprecated.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, differentiable (see _SumOverRanks)."""
    return _SumOverRanks.apply(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch of all ranks, on any device.

    torch's ``SyncBatchNorm`` (used on GPUs) refuses CPU tensors: its kernels exist only for accelerators.
    This one uses two differentiable all-reduces (:func:`sum_over_ranks`): the per-channel sum and count, then the sum
    of squared deviations
    from the global mean. The forward and backward are the global batch's, as one process computes them,
    up to float rounding. Evaluation, and a single process, use the running statistics as BatchNorm2d does;
    the state dict is BatchNorm2d's, so checkpoints are the same whatever trained them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, dims = x.shape[1], (0, 2, 3)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // channels)])
        total = sum_over_ranks(local)
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

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, convert(child))
        return module

    return convert(model)

"""Stopping a training cleanly, and resuming it at the epoch where it stopped.

At the end of every epoch, train writes everything the next epoch depends on to
``.segpipe/resume/<dataset>/state.pt`` (atomically): the model, the optimiser, the learning-rate schedule,
the random states (numpy's generator that orders the samples, torch's CPU generator and that of the GPU
it trains on; the augmentation is reseeded from (seed, epoch, batch) and nothing else draws), fp16's loss
scale, the number of epochs done and the curve rows so far. dvclive writes its curves beside it (``curves/``), and they
are copied to
``metrics/<dataset>/train`` only once the model is written: until the stage succeeds, its tracked outputs
stay as they were. On success the directory is removed.

Why there: a git-ignored directory outside DVC's outputs. An output is cached, pushed, and must exist after
every run of its stage; the state of one working copy's interrupted run is none of that, and git must not
pick it up either. A queued or ``--temp`` experiment runs in a fresh copy and starts at epoch 1.

A state is used only by a run of the same params section, on the same prepared data (sha256 of its files),
under the same runtime (device, thread count, torch version, CPU instruction set, precision, number of
processes: each changes the arithmetic, so an epoch computed under one and the next under another would give weights
that no
uninterrupted run gives); otherwise it is discarded, with a message saying why. The training code is not
part of the key: DVC reruns train after any edit of a module it imports, a comment included, and such an
edit should not throw away hours of training. A state must still fit the code that loads it -- the same
tensors of the same shapes, the same optimiser layout, curve rows of the names train logs with finite
values (dvclive makes each name a file name) -- or it is discarded too. Delete
``.segpipe/resume/<dataset>`` to start over after an edit that changes the training's arithmetic.

With several processes (pipeline/distributed.py), rank 0 alone writes and reads the state, and hands what it
read to the other ranks (:func:`read_state`, then :func:`restore` on every rank), so that only rank 0's
machine needs the directory.

One training of a dataset at a time (:func:`training_lock`): a second would resume from the first's state,
and the published curves would lose epochs. It is refused at once, in one line naming the first's pid.

SIGINT and SIGTERM stop a training cleanly: the current step (or the epoch's validation) finishes, the state
on disk is the last complete epoch's, and the stage exits with 128 + the signal's number. A second signal
stops it at once, except while a state or the outputs are being written. With several processes, the
decision to stop is taken by all ranks together at each check, so that they stop after the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.atomic import write_torch
from pipeline.checkpoint import check_torch_file
from pipeline.prepared import error_reason
from pipeline.stage import StageError

RESUME_ROOT = Path(".segpipe/resume")
FORMAT = 1  # of state.pt; a state of another format is discarded
# The curves train logs, one row per epoch: without validation (an empty validation split), or with it.
CURVE_ROWS = ({"train_loss", "lr"}, {"train_loss", "val_loss", "val_dice", "lr"})


def state_dir(dataset: str) -> Path:
    return RESUME_ROOT / dataset


@contextlib.contextmanager
def training_lock(dataset: str) -> Iterator[None]:
    """Within the block this process alone trains ``dataset`` here: a second training would resume from the
    first's state and overwrite it, and the published curves would lose epochs.

    ``flock`` on ``.segpipe/resume/<dataset>.lock``, beside the state's directory (which is removed on
    success: a lock file in it could be held by two processes at once, one on the removed file and one on
    its successor). The kernel releases it when the process ends, however it ends. Refused at once, never
    waited for.
    """
    path = RESUME_ROOT / f"{dataset}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StageError(
                f"{path}: another training of {dataset} is running{pid}; wait for it to end, or stop it"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


@dataclasses.dataclass(frozen=True)
class ResumeKey:
    """What a state must have been written under to be resumed (see the module's docstring)."""

    params: dict  # the stage's params section
    data: str  # pipeline.prepared.dataset_digest of the prepared dataset
    runtime: dict  # pipeline.runtime.describe

    def as_saved(self) -> dict:
        return {
            "params": json.dumps(self.params, sort_keys=True),
            "data": self.data,
            "runtime": json.dumps(self.runtime, sort_keys=True),
        }

    def mismatch(self, saved: dict, section: str) -> str | None:
        """Why a state written under ``saved`` (an ``as_saved()``) does not fit this key; None if it does."""
        mine = self.as_saved()
        if saved["params"] != mine["params"]:
            return (
                f"it was written under other params ({_differences(json.loads(saved['params']), self.params, section)})"
            )
        if saved["data"] != mine["data"]:
            return "it was written for other prepared data"
        if saved["runtime"] != mine["runtime"]:
            return (
                f"it was written under another runtime ({_differences(json.loads(saved['runtime']), self.runtime)}), "
                f"and resuming would give weights that no uninterrupted run gives"
            )
        return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(old: dict, new: dict, section: str = "") -> str:
    old, new = _flatten(old), _flatten(json.loads(json.dumps(new)))  # tuples compare as the lists they were saved as
    prefix = f"{section}." if section else ""
    changed = [
        f"{prefix}{key} was {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")


# ------------------------------------------------------------------------------------------ the state


@dataclasses.dataclass
class Training:
    """The objects a training epoch changes, as train builds them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    rng: np.random.Generator  # the sample order
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (pipeline/precision.py)


def save_state(path: Path, key: ResumeKey, training: Training, curves: list[dict]) -> None:
    """Write the state after ``len(curves)`` complete epochs (one curve row per epoch)."""
    state = {
        "format": FORMAT,
        "key": key.as_saved(),
        "epochs_done": len(curves),
        "curves": curves,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": None if training.scheduler is None else training.scheduler.state_dict(),
        "numpy_rng": training.rng.bit_generator.state,  # plain ints and strings
        "torch_rng": torch.get_rng_state(),
        # The generator of the GPU this process trains on only: touching the others would start a CUDA
        # context on each of them, in every rank.
        "cuda_rng": [torch.cuda.get_rng_state(training.device)] if training.device.type == "cuda" else None,
        "scaler": None if training.scaler is None else training.scaler.state_dict(),
    }
    write_torch(path, state)


def _layout(state_dict: dict) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()}


def _optimizer_layout(state_dict: dict) -> list:
    return [(len(group["params"]), sorted(k for k in group if k != "params")) for group in state_dict["param_groups"]]


def _unfit_curves(curves: list) -> str | None:
    """Why the curve rows of a state are not rows train logs; None if they are. They are replayed into dvclive,
    which makes each name a file name."""
    for number, row in enumerate(curves, 1):
        if not isinstance(row, dict):
            return f"its curve row {number} is not a row of named numbers"
        unknown = sorted(str(name) for name in row if name not in CURVE_ROWS[1])
        if unknown:
            return f"its curve row {number} has unknown names {unknown} (train logs {sorted(CURVE_ROWS[1])})"
        if set(row) not in CURVE_ROWS or set(row) != set(curves[0]):
            return f"its curve row {number} has the curves {sorted(row)}, row 1 {sorted(curves[0])}"
        for name, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"its curve row {number} has {name} {value!r}, not a finite number"
    return None


def _unfit(state: dict, training: Training, epochs: int) -> str | None:
    """Why ``state`` cannot be restored into ``training``; None if it can. Checked before anything changes."""
    if (
        not isinstance(state["epochs_done"], int)
        or not 1 <= state["epochs_done"] <= epochs
        or not isinstance(state["curves"], list)
        or len(state["curves"]) != state["epochs_done"]
    ):
        rows = len(state["curves"]) if isinstance(state["curves"], list) else type(state["curves"]).__name__
        return f"it holds {state['epochs_done']!r} epochs of {epochs} and {rows} curve rows"
    if problem := _unfit_curves(state["curves"]):
        return problem
    if _layout(state["model"]) != _layout(training.model.state_dict()):
        return "its model tensors are not those of the model this code builds"
    if _optimizer_layout(state["optimizer"]) != _optimizer_layout(training.optimizer.state_dict()):
        return "its optimiser does not match the one this code builds"
    expected_scheduler = None if training.scheduler is None else sorted(training.scheduler.state_dict())
    if (None if state["scheduler"] is None else sorted(state["scheduler"])) != expected_scheduler:
        return "its learning-rate schedule does not match the one this code builds"
    try:
        np.random.Generator(type(training.rng.bit_generator)()).bit_generator.state = state["numpy_rng"]
    except (TypeError, ValueError, KeyError) as e:
        return f"its numpy random state does not fit {type(training.rng.bit_generator).__name__}: {e}"
    if state["torch_rng"].shape != torch.get_rng_state().shape:
        return "its torch random state is not one of this torch"
    if training.device.type == "cuda" and len(state["cuda_rng"] or []) != 1:
        return "it holds no CUDA random state of one GPU"
    if (state.get("scaler") is None) != (training.scaler is None):
        return "its fp16 loss scale does not match this training's precision"
    return None


def load_state(path: Path, key: ResumeKey, section: str, training: Training, epochs: int) -> list[dict]:
    """Restore the state at ``path`` into ``training`` and return its curve rows, one per epoch done.

    A state that is missing returns [] (a fresh start); one that is unreadable, of another format, written
    under another key or that does not fit ``training`` is deleted, with a message saying why, and
    returns [] too. Nothing in ``training`` changes unless the whole state fits.
    """
    return restore(read_state(path, key, section, training, epochs), training)


def read_state(path: Path, key: ResumeKey, section: str, training: Training, epochs: int) -> dict | None:
    """The state at ``path`` if it fits ``training`` (see :func:`load_state`), else None; changes nothing in
    ``training``, and deletes a state that does not fit."""
    if not path.exists():
        return None
    try:
        check_torch_file(path, "training state")  # members bounded before torch inflates them
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            problem = f"it is not a training state of format {FORMAT} (found {found!r})"
        else:
            problem = key.mismatch(state["key"], section) or _unfit(state, training, epochs)
    except Exception as e:  # torch raises several types for a file that is not what it should be
        problem = f"it is not a readable training state ({type(e).__name__}: {error_reason(e)})"
    if problem:
        print(f"discarding {path}: {problem}; training from epoch 1", flush=True)
        path.unlink()
        return None
    return state


def restore(state: dict | None, training: Training) -> list[dict]:
    """Put a state that :func:`read_state` returned into ``training``; its curve rows ([] for None)."""
    if state is None:
        return []
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    if training.scheduler is not None:
        training.scheduler.load_state_dict(state["scheduler"])
    training.rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if training.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"][0], training.device)
    if training.scaler is not None:
        training.scaler.load_state_dict(state["scaler"])
    return state["curves"]


# ------------------------------------------------------------------------------------------ signals


class Stopped(BaseException):
    """SIGINT or SIGTERM asked the training to stop.

    A BaseException, like KeyboardInterrupt, so that no library's ``except Exception`` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask the training to stop at its next check point.

    The first signal is only noted: :meth:`check` (called between two training steps, by
    :meth:`between_steps`, and after each epoch's state is written) then raises :class:`Stopped`, so that a
    step is never cut in half. A second signal, from someone who does not want to wait, raises at once,
    except inside ``held()``: a write there always finishes first.

    A forked child (the augmenting worker) receives the terminal's SIGINT too: there the signal gets the
    handling it had before, and the worker ends as it would without this (train's augmenting worker, once
    started, ignores SIGINT and SIGTERM altogether and ends with its parent).

    ``agree`` (several processes: pipeline.distributed.Group.agree) turns this process's pending signal into
    the one all processes act on, so that each check stops all of them or none; every process must then call
    :meth:`check` (and :meth:`held`) at the same points.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, agree: Callable[[int | None], int | None] | None = None):
        self._agree = agree

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        self._holding = False
        self.pending: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        elif self.pending is None or self._holding:
            self.pending = self.pending or signum
        else:
            raise Stopped(signum)

    def check(self) -> None:
        if self._agree is not None:
            self.pending = self._agree(self.pending)
        if self.pending is not None:
            raise Stopped(self.pending)

    def between_steps(self, loader: torch.utils.data.DataLoader) -> _CheckedBatches:
        """``loader``, checking for a stop request before handing out each batch."""
        return _CheckedBatches(loader, self)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Even a second stop request waits for the end of the block (a write that must not be cut short)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        self.check()


class _CheckedBatches:
    def __init__(self, loader: torch.utils.data.DataLoader, signals: StopSignals):
        self.loader, self.signals = loader, signals

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.signals.check()
            yield batch

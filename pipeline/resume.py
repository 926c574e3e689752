"""Stopping a training cleanly, and resuming it at the epoch where it stopped, bit for bit.

After every epoch the training's whole state goes to ``.segpipe/resume/<dataset>/state.pt`` (git-ignored, outside
DVC's outputs): model, optimiser, schedule, random states, fp16's loss scale, the curve rows so far. It is used
only by a run of the same params section, prepared data and runtime, and only if it fits the code that loads
it; otherwise it is discarded with one line saying why. SIGINT and SIGTERM stop a training between two steps
(:class:`StopSignals`). With several processes rank 0 alone reads and writes it. Why, and what the key holds:
docs/training.md, "Stopping and resuming".
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
    """Within the block this process alone trains ``dataset`` here: ``flock`` on ``.segpipe/resume/<dataset>.lock``,
    beside the state's directory (removed on success), released by the kernel however the process ends. Refused
    at once, never waited for."""
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

    The first signal is only noted: :meth:`check` (between two steps, and after each epoch's state is written)
    raises :class:`Stopped`, so a step is never cut in half. A second signal raises at once, except inside
    ``held()``, where a write always finishes first. A forked child (the augmenting worker) gets the signal's
    previous handling. ``agree`` (several processes: ``Group.agree``) makes each check stop all processes or none,
    so every process must call :meth:`check` and :meth:`held` at the same points.
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

"""Stopping a training cleanly, and resuming it at the epoch where it stopped, bit for bit.

After every epoch the whole state goes to ``.segpipe/resume/<dataset>/state.pt``; it is resumed only under the
same params, prepared data and runtime, else discarded with one line saying why. SIGINT and SIGTERM stop a
training between two steps (:class:`StopSignals`). docs/training.md, "Stopping and resuming".
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


@contextlib.contextmanager
def training_lock(dataset: str) -> Iterator[None]:
    """Within the block this process alone trains ``dataset`` here (``flock``, released however the process
    ends); refused at once, never waited for."""
    path = RESUME_ROOT / f"{dataset}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            message = f"{path}: another training of {dataset} is running{pid}; wait for it to end, or stop it"
            raise StageError(message) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    old, new = _flatten(old), _flatten(json.loads(json.dumps(new)))  # tuples compare as the lists they were saved as
    keys = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    changed = [f"{prefix}{key} was {old.get(key)!r}, now {new.get(key)!r}" for key in keys]
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")


@dataclasses.dataclass(frozen=True)
class ResumeKey:
    """What a state must have been written under to be resumed."""

    params: dict  # the stage's params section
    data: str  # pipeline.prepared.dataset_digest of the prepared dataset
    runtime: dict  # pipeline.runtime.describe

    def as_saved(self) -> dict:
        params, runtime = json.dumps(self.params, sort_keys=True), json.dumps(self.runtime, sort_keys=True)
        return {"params": params, "data": self.data, "runtime": runtime}

    def mismatch(self, saved: dict, section: str) -> str | None:
        """Why a state written under ``saved`` (an ``as_saved()``) does not fit this key; None if it does."""
        mine = self.as_saved()
        if saved["params"] != mine["params"]:
            changed = _differences(json.loads(saved["params"]), self.params, f"{section}." if section else "")
            return f"it was written under other params ({changed})"
        if saved["data"] != mine["data"]:
            return "it was written for other prepared data"
        if saved["runtime"] != mine["runtime"]:
            return (
                f"it was written under another runtime ({_differences(json.loads(saved['runtime']), self.runtime)}), "
                f"and resuming would give weights that no uninterrupted run gives"
            )
        return None


@dataclasses.dataclass
class Training:
    """The objects a training epoch changes, as train builds them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    rng: np.random.Generator  # the sample order
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (pipeline/precision.py)


def _state_dict(part) -> dict | None:
    return None if part is None else part.state_dict()


def save_state(path: Path, key: ResumeKey, training: Training, curves: list[dict]) -> None:
    """Write the state after ``len(curves)`` complete epochs (one curve row per epoch)."""
    cuda = training.device.type == "cuda"
    state = {
        "format": FORMAT,
        "key": key.as_saved(),
        "epochs_done": len(curves),
        "curves": curves,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": _state_dict(training.scheduler),
        "numpy_rng": training.rng.bit_generator.state,  # plain ints and strings
        "torch_rng": torch.get_rng_state(),
        # Only this process's GPU: touching the others would start a CUDA context on each, in every rank.
        "cuda_rng": [torch.cuda.get_rng_state(training.device)] if cuda else None,
        "scaler": _state_dict(training.scaler),
    }
    write_torch(path, state)


def _unfit_curves(curves: list) -> str | None:
    """Why a state's curve rows are not rows train logs (replayed into dvclive, which makes names file names)."""
    for number, row in enumerate(curves, 1):
        if not isinstance(row, dict):
            return f"its curve row {number} is not a row of named numbers"
        if unknown := sorted(str(name) for name in row if name not in CURVE_ROWS[1]):
            return f"its curve row {number} has unknown names {unknown} (train logs {sorted(CURVE_ROWS[1])})"
        if set(row) not in CURVE_ROWS or set(row) != set(curves[0]):
            return f"its curve row {number} has the curves {sorted(row)}, row 1 {sorted(curves[0])}"
        for name, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"its curve row {number} has {name} {value!r}, not a finite number"
    return None


def _unfit(state: dict, training: Training, epochs: int) -> str | None:
    """Why ``state`` cannot be restored into ``training``; None if it can. Checked before anything changes."""
    done, curves = state["epochs_done"], state["curves"]
    if not isinstance(done, int) or not 1 <= done <= epochs or not isinstance(curves, list) or len(curves) != done:
        rows = len(curves) if isinstance(curves, list) else type(curves).__name__
        return f"it holds {done!r} epochs of {epochs} and {rows} curve rows"
    if problem := _unfit_curves(curves):
        return problem

    def layout(model_state: dict) -> dict:
        return {name: (tuple(t.shape), t.dtype) for name, t in model_state.items()}

    def groups(optimizer_state: dict) -> list:
        return [(len(g["params"]), sorted(k for k in g if k != "params")) for g in optimizer_state["param_groups"]]

    if layout(state["model"]) != layout(training.model.state_dict()):
        return "its model tensors are not those of the model this code builds"
    if groups(state["optimizer"]) != groups(training.optimizer.state_dict()):
        return "its optimiser does not match the one this code builds"
    scheduler = _state_dict(training.scheduler)
    if (None if state["scheduler"] is None else sorted(state["scheduler"])) != (scheduler and sorted(scheduler)):
        return "its learning-rate schedule does not match the one this code builds"
    bit_generator = type(training.rng.bit_generator)
    try:
        np.random.Generator(bit_generator()).bit_generator.state = state["numpy_rng"]
    except (TypeError, ValueError, KeyError) as e:
        return f"its numpy random state does not fit {bit_generator.__name__}: {e}"
    if state["torch_rng"].shape != torch.get_rng_state().shape:
        return "its torch random state is not one of this torch"
    if training.device.type == "cuda" and len(state["cuda_rng"] or []) != 1:
        return "it holds no CUDA random state of one GPU"
    if (state.get("scaler") is None) != (training.scaler is None):
        return "its fp16 loss scale does not match this training's precision"
    return None


def load_state(path: Path, key: ResumeKey, section: str, training: Training, epochs: int) -> list[dict]:
    """Restore the state at ``path`` into ``training``; its curve rows, [] for a missing or discarded state."""
    return restore(read_state(path, key, section, training, epochs), training)


def read_state(path: Path, key: ResumeKey, section: str, training: Training, epochs: int) -> dict | None:
    """The state at ``path`` if it fits ``training``, else None (a state that does not fit is deleted, with a
    line saying why); changes nothing in ``training``."""
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


class Stopped(BaseException):
    """SIGINT or SIGTERM asked the training to stop (a BaseException, so that no ``except Exception`` takes it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask the training to stop at its next :meth:`check`.

    A second signal raises at once, except inside ``held()``; a forked child gets the previous handling.
    ``agree`` (``Group.agree``) makes each check stop all processes or none, so all must check at the same points.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, agree: Callable[[int | None], int | None] | None = None):
        self._agree = agree

    def __enter__(self) -> StopSignals:
        self._pid, self._holding, self.pending = os.getpid(), False, None
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

    def between_steps(self, loader: torch.utils.data.DataLoader) -> Iterator:
        """``loader``'s batches, checking for a stop request before handing out each."""
        for batch in loader:
            self.check()
            yield batch

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Even a second stop request waits for the end of the block (a write that must not be cut short)."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        self.check()

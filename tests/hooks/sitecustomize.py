"""Test hooks for trainings that tests start as processes of their own (tests/training_hooks.py puts this folder
on PYTHONPATH; torchrun's workers inherit it). When one of these variables is set, a callback is appended to
pipeline.engine's ``CALLBACKS`` as that module is imported (never earlier, nor in a process that does not):

- ``SEGPIPE_TEST_FAIL_RANK=<r>``: rank r raises at its first training step;
- ``SEGPIPE_TEST_SAMPLE_LOG=<dir>``: each rank appends a line per step to ``<dir>/rank<r>.jsonl``, the indices of
  the training samples it consumed in it;
- ``SEGPIPE_TEST_HOLD_S=<s>``: after each epoch, wait up to s seconds for a stop signal, so that a test stopping
  the training when it reads an epoch's line does not race the next epochs on a loaded machine;
- ``SEGPIPE_TEST_SHARD_BYTES=<n>``: prepare writes shards of n bytes (pipeline.prepared.SHARD_BYTES), so that a
  small dataset makes many shards.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

FAIL_RANK_ENV = "SEGPIPE_TEST_FAIL_RANK"
SAMPLE_LOG_ENV = "SEGPIPE_TEST_SAMPLE_LOG"
HOLD_ENV = "SEGPIPE_TEST_HOLD_S"
SHARD_BYTES_ENV = "SEGPIPE_TEST_SHARD_BYTES"


class TestHooks:
    def __init__(self):
        self.fail_rank = os.environ.get(FAIL_RANK_ENV)
        self.sample_log = os.environ.get(SAMPLE_LOG_ENV)
        self.hold_s = float(os.environ.get(HOLD_ENV) or 0)

    def on_step_start(self, trainer, epoch: int, step: int, batches) -> None:
        if self.fail_rank == str(trainer.rank):
            raise RuntimeError(
                f"injected failure in rank {trainer.rank} (${FAIL_RANK_ENV}, tests/hooks/sitecustomize.py)"
            )
        if self.sample_log:
            samples = [int(s) for s in batches.indices(step)]
            with open(os.path.join(self.sample_log, f"rank{trainer.rank}.jsonl"), "a") as f:
                f.write(f'{{"epoch": {epoch}, "step": {step}, "samples": {samples}}}\n')

    def on_epoch_end(self, trainer, epoch: int) -> None:
        deadline = time.monotonic() + self.hold_s
        while trainer.signals.pending is None and time.monotonic() < deadline:
            time.sleep(0.01)


class AttachWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``module`` is imported, calls ``attach`` on it once it has run."""

    def __init__(self, module: str, attach):
        self.module, self.attach = module, attach

    def find_spec(self, name, path, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            self.attach(module)

        spec.loader.exec_module = exec_module
        return spec


def set_shard_bytes(prepared) -> None:
    prepared.SHARD_BYTES = int(os.environ[SHARD_BYTES_ENV])


if any(os.environ.get(name) for name in (FAIL_RANK_ENV, SAMPLE_LOG_ENV, HOLD_ENV)):
    sys.meta_path.insert(0, AttachWhenImported("pipeline.engine", lambda engine: engine.CALLBACKS.append(TestHooks())))
if os.environ.get(SHARD_BYTES_ENV):
    sys.meta_path.insert(0, AttachWhenImported("pipeline.prepared", set_shard_bytes))

"""The training loader: an epoch's batches read from the prepared shards and augmented in one worker process.

Batch ``i`` is reseeded from (seed, epoch, i), so it does not depend on which process augments it, or when; the
worker ignores stop signals, and an error in it ends the training (:class:`WorkerFailed`). docs/training.md,
"The loader".
"""

from __future__ import annotations

import signal
import sys

import numpy as np
import torch

from pipeline.distributed import shard
from pipeline.losses import IGNORE
from pipeline.prepared import PreparedDataError, PreparedSplit, Sample

KEEP_SPLIT_BYTES = 64 * 2**20  # a training split whose images and targets fit in this is read once an epoch
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def training_target(sample: Sample) -> np.ndarray:
    """The mask with pixels outside the field of view set to IGNORE."""
    return sample.mask if sample.fov is None else np.where(sample.fov, sample.mask, np.uint8(IGNORE))


class AugmentedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch, each sample augmented; with ``world`` processes, rank ``rank``'s contiguous part.

    A rank augments the samples before its part too, and drops them: the augmentation draws its random numbers
    sample after sample, so each sample gets the very warp one process gives it.
    """

    def __init__(self, split: PreparedSplit, order, batch_size: int, augment, seed: int, epoch: int, rank=0, world=1):
        self.split, self.order, self.batch_size = split, order, batch_size
        self.augment, self.seed, self.epoch = augment, seed, epoch
        self.rank, self.world = rank, world
        self.keep = sum(h * w * (split.channels + 1) for h, w in split.sizes) <= KEEP_SPLIT_BYTES
        self._kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def global_batch(self, i: int) -> np.ndarray:
        """The indices of batch ``i``'s samples, all ranks' parts in rank order."""
        return self.order[i * self.batch_size : (i + 1) * self.batch_size]

    def indices(self, i: int) -> np.ndarray:
        """The indices of this rank's samples of batch ``i``."""
        index = self.global_batch(i)
        return index[shard(len(index), self.rank, self.world)]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.global_batch(i)
        part = shard(len(index), self.rank, self.world)
        self.augment.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
        try:
            samples = [self._augmented(j) for j in index[: part.stop]][part.start :]
        except PreparedDataError as e:  # a damaged shard: said in one line by the training process, not a traceback
            return {PreparedDataError.__name__: str(e)}
        return np.stack([s["image"] for s in samples]), np.stack([s["mask"] for s in samples])

    def _augmented(self, j: int) -> dict:
        pair = self._kept.get(int(j))
        if pair is None:
            sample = self.split.read(int(j), ("image", "mask", "fov"))
            pair = sample.image, training_target(sample)
            if self.keep:
                for array in pair:
                    array.setflags(write=False)  # kept for the next patch: an augmentation must not write into it
                self._kept[int(j)] = pair
        return self.augment(image=pair[0], mask=pair[1])


def _ignore_stop_signals(worker_id: int) -> None:
    """The worker leaves stop signals to the training process; ignoring them discards any that arrived while they
    were blocked (:class:`StopSignalSafeLoader`), and only then are they unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class WorkerFailed(Exception):
    """The augmenting worker raised, or died, at this epoch's ``step`` (0-based); torch's report is printed."""

    def __init__(self, step: int):
        super().__init__(f"the augmenting worker failed at step {step}")
        self.step = step


class StopSignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker starts with SIGINT and SIGTERM blocked (else a signal before ``worker_init_fn``
    kills it), and, as a context manager, ends its worker on leaving the block, whatever the error."""

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._live = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self._batches(self._live)

    @staticmethod
    def _batches(iterator):
        # Only the worker's batches come out of next(): an error raised here is the worker's.
        step = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as e:
                print(e, file=sys.stderr, flush=True)  # torch's report: the worker's traceback
                raise WorkerFailed(step) from None
            if isinstance(batch, dict):  # AugmentedBatches found the prepared data damaged
                raise PreparedDataError(batch[PreparedDataError.__name__])
            yield batch
            step += 1

    def __enter__(self) -> StopSignalSafeLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the worker now (after an error the interpreter's exit would wait for it for ever)."""
        iterator, self._live = getattr(self, "_live", None), None
        if iterator is None:
            return
        try:
            iterator._shutdown_workers()
        finally:  # even if a second stop signal cut it short
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join()


def augmenting_loader(batches: AugmentedBatches, device: torch.device) -> StopSignalSafeLoader:
    """(images uint8 NHWC, targets uint8 NHW) tensors, augmented ahead in a worker process; use it in a ``with``."""
    options = dict(batch_size=None, shuffle=False, num_workers=1, prefetch_factor=2, pin_memory=device.type == "cuda")
    return StopSignalSafeLoader(batches, **options, worker_init_fn=_ignore_stop_signals)

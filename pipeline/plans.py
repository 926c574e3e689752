"""How a dataset kind's :class:`Plan` becomes prepared shards: decoded on every core, written in order, tallied.

A sample whose fingerprint (source digest, split, :func:`recipe`) a shard already holds keeps that shard.
Design and measurements: docs/prepared-format.md.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import prepared
from pipeline.prepared import ROLES, SPLITS, DatasetMeta, PreparedSplit, PreparedWriter, Sample, open_splits
from pipeline.stage import StageError

IN_FLIGHT_PER_PROCESS = 2  # decoded tasks waiting to be written, per worker: memory stays a few samples each
SLOT_BYTES = 64 * 2**20  # a task's arrays up to this size reach the writer through shared memory


@dataclass(frozen=True)
class Source:
    """One sample to prepare: its id, the sha256 of the raw bytes it is made from, what the kind's decode needs."""

    id: str
    digest: str
    payload: Any = None


@dataclass
class Plan:
    """What a kind's ``plan`` returns: every split's sources in id order, and how to decode and describe them.

    ``decode`` runs in forked workers, a chunk at a time; ``tally`` counts a few samples of a split (always with
    "pixels", int64 per class); ``summarize`` makes the kind's summary from each split's tally and index."""

    meta: DatasetMeta
    splits: dict[str, list[Source]]
    decode: Callable[[Sequence[Source]], list[Sample]]
    tally: Callable[[Sequence[Sample]], dict]
    summarize: Callable[[dict[str, dict], dict[str, PreparedSplit]], dict]
    chunk: int = 1  # sources per task handed to a worker
    parallel: bool = True  # False where decoding costs less than sending the samples (MNIST)


def recipe(kind: str, module, settings) -> str:
    """What every sample depends on besides its raw bytes: the kind, its ``VERSION``, ``FORMAT`` and the params
    (versions, not the code's text: a refactoring keeps every output)."""
    versions = {"kind": kind, "kind_version": module.VERSION, "format": prepared.FORMAT}
    return hashlib.sha256(
        json.dumps([versions, dataclasses.asdict(settings)], sort_keys=True, default=str).encode()
    ).hexdigest()


def fingerprint(recipe_digest: str, split: str, source: Source) -> str:
    return hashlib.sha256(f"{recipe_digest}\0{split}\0{source.id}\0{source.digest}".encode()).hexdigest()


_JOB: Callable[[Any, int], Any] | None = None


def _work(task, slot: int):
    return _JOB(task, slot)


def in_order(function: Callable[[Any, int], Any], tasks: Iterable, processes: int) -> Iterator:
    """``function(task, slot)`` of every task, in order, by ``processes`` forked workers, IN_FLIGHT_PER_PROCESS each
    ahead at most; ``slot`` is free until the next result is asked for. A dead worker is a StageError."""
    global _JOB
    if processes <= 1:
        for task in tasks:
            yield function(task, 0)
        return
    _JOB = function
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"))
    try:
        pending: collections.deque = collections.deque()
        free, queue = list(range(slots(processes)))[::-1], iter(tasks)
        while True:
            while free and (task := next(queue, _END)) is not _END:
                slot = free.pop()
                pending.append((pool.submit(_work, task, slot), slot))
            if not pending:
                return
            future, slot = pending.popleft()
            try:
                result = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                raise StageError(
                    "a worker process died (killed by the system: out of memory?); nothing was written"
                ) from None
            yield result
            free.append(slot)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None


_END = object()


def slots(processes: int) -> int:
    return IN_FLIGHT_PER_PROCESS * max(processes, 1)


class SharedSlots:
    """Anonymous memory mapped before the workers fork, a slot per task in flight, where a worker leaves its
    task's arrays for the writer to read in place; those that do not fit go through the pool's pipe."""

    def __init__(self, count: int):
        self.size = SLOT_BYTES
        self.memory = mmap.mmap(-1, count * self.size)  # MAP_SHARED

    def put(self, slot: int, samples: list[Sample]) -> list:
        arrays = [[(role, getattr(s, role)) for role in ROLES if getattr(s, role) is not None] for s in samples]
        if sum(-(-a.nbytes // 64) * 64 for roles in arrays for _, a in roles) > self.size:
            return samples
        offset, packed = slot * self.size, []
        for sample, roles in zip(samples, arrays):
            placed = {}
            for role, array in roles:
                np.ndarray(array.shape, array.dtype, buffer=self.memory, offset=offset)[...] = array
                placed[role] = (array.shape, array.dtype.str, offset)
                offset += -(-array.nbytes // 64) * 64
            packed.append((sample.id, placed))
        return packed

    def get(self, packed: list) -> list[Sample]:
        if not packed or isinstance(packed[0], Sample):
            return packed
        return [
            Sample(
                id_,
                **{
                    role: np.ndarray(shape, np.dtype(dtype), buffer=self.memory, offset=offset)
                    for role, (shape, dtype, offset) in placed.items()
                },
            )
            for id_, placed in packed
        ]


def each(decode: Callable[[Source], Sample], sources: Sequence[Source]) -> list[Sample]:
    return [decode(source) for source in sources]


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def decoding_processes() -> int:
    """One per usable core (the CPU affinity)."""
    return max(1, len(os.sched_getaffinity(0)))


def add_tally(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value


def write_plan(
    plan: Plan, directory: Path, recipe_digest: str, shard_bytes: int = prepared.SHARD_BYTES
) -> tuple[int, dict[str, dict]]:
    """Decode and write ``plan``'s samples into ``directory``, keeping its shards that hold the same samples;
    returns how many were decoded and each split's tally."""
    processes = decoding_processes() if plan.parallel else 1
    tallies: dict[str, dict] = {name: {} for name in SPLITS}
    kept_ids: dict[str, set[str]] = {}
    with PreparedWriter(directory, plan.meta, shard_bytes) as writer:
        tasks, todo = [], {}
        for name in SPLITS:
            prints = [fingerprint(recipe_digest, name, source) for source in plan.splits[name]]
            kept = writer.plan(name, prints)
            kept_ids[name] = {s.id for s, p in zip(plan.splits[name], prints) if p in kept}
            todo[name] = [(s, p) for s, p in zip(plan.splits[name], prints) if p not in kept]
            tasks += [(name, start) for start in range(0, len(todo[name]), plan.chunk)]
        shared = None
        if processes > 1:
            try:
                shared = SharedSlots(slots(processes))
            except OSError:  # no room to map it (a strict overcommit limit): the arrays go through the pipe
                pass

        def decode(task: tuple[str, int], slot: int) -> tuple[dict, list]:
            name, start = task
            samples = plan.decode([source for source, _ in todo[name][start : start + plan.chunk]])
            counts = plan.tally(samples)
            return counts, samples if shared is None else shared.put(slot, samples)

        for (name, start), (counts, packed) in zip(tasks, in_order(decode, tasks, processes)):
            samples = packed if shared is None else shared.get(packed)
            for sample, (_, print_) in zip(samples, todo[name][start : start + plan.chunk], strict=True):
                writer.add(name, sample, print_)
            if shared is not None:
                writer.own_pending()  # what stays in a block being gathered leaves the slot, which is reused
            add_tally(tallies[name], counts)
        shared = samples = packed = None  # the slots' memory goes with the last views of it
    for name, part in tally_kept(plan, directory, kept_ids, processes).items():
        add_tally(tallies[name], part)
    return sum(len(t) for t in todo.values()), tallies


def tally_kept(plan: Plan, directory: Path, kept: dict[str, set[str]], processes: int) -> dict[str, dict]:
    """The tallies of the samples in kept shards, read back on every core."""
    if not any(kept.values()):
        return {}
    splits = open_splits(directory, [name for name in SPLITS if kept[name]], verify=False)
    tasks = []
    for name, split in splits.items():
        indices = [i for i, id_ in enumerate(split.ids) if id_ in kept[name]]
        tasks += [(name, chunk) for chunk in chunks(indices, max(1, prepared.BATCH_PIXELS // math.prod(split.largest)))]

    def read_back(task: tuple[str, Sequence[int]], slot: int) -> dict:
        name, indices = task
        return plan.tally(splits[name].read_many(indices, ("mask", "fov", "reference")))

    out: dict[str, dict] = {name: {} for name in splits}
    for (name, _), part in zip(tasks, in_order(read_back, tasks, processes)):
        add_tally(out[name], part)
    return out


def summary(plan: Plan, directory: Path, tallies: dict[str, dict]) -> dict:
    """data.json: images and foreground fraction per split (first: `dvc plots` draws a file's first list), then
    the kind's summary."""
    splits = open_splits(directory, verify=False)
    records = []
    for name, split in splits.items():
        pixels = tallies[name].get("pixels", np.zeros(1, np.int64))
        records.append(
            {
                "split": name,
                "images": len(split),
                "foreground_fraction": round(int(pixels[1:].sum()) / max(int(pixels.sum()), 1), 6),
            }
        )
    return {"splits": records, **plan.summarize(tallies, splits)}

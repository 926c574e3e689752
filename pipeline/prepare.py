"""Stage 2: turn a dataset's raw files into the prepared format (see pipeline/prepared.py).

This is where dataset-specific code ends. params.yaml's ``datasets`` maps each dataset's name to its kind, the
module ``pipeline/datasets/<kind>.py`` that knows its raw files and declares its own ``PrepareParams`` (the
``<name>.prepare`` section): ``mnist`` and ``stare`` for the built-in datasets, ``folder`` for any folder of
images and masks described in params.yaml alone. Every stage after this one reads only the prepared format.

A kind's ``plan`` lists each split's samples (:class:`Source`: an id and a digest of the raw bytes it is made
from) without decoding them; this stage decodes them on all cores and writes them as they come, in order, so
the output is the same whatever the number of processes and memory holds a few samples per process, never a
split. A sample's fingerprint is its source digest with the params, the split and the version of the kind's
decoding (:func:`recipe`): samples whose fingerprints are all in an existing shard keep that shard
(pipeline.prepared.PreparedWriter), so only added or changed images are decoded and written again (dvc.yaml
declares the output ``persist``, so that DVC leaves the previous version in place for this).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import time

import numpy as np
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pipeline import prepared
from pipeline.atomic import write_json
from pipeline.params import PARAMS_FILE, ParamError, load_params, read_params_file
from pipeline.prepared import SPLITS, DatasetMeta, PreparedSplit, PreparedWriter, Sample, open_splits
from pipeline.stage import DatasetPaths, StageError, run


@dataclass(frozen=True)
class Source:
    """One sample to prepare: its id, the sha256 of the raw bytes it is made from, what the kind's decode needs."""

    id: str
    digest: str
    payload: Any = None


@dataclass
class Plan:
    """What a kind's ``plan`` returns: every split's sources in id order, and how to decode and describe them."""

    meta: DatasetMeta
    splits: dict[str, list[Source]]
    decode: Callable[[Sequence[Source]], list[Sample]]  # in forked worker processes, a chunk at a time: it may
    # use the raw data the kind loaded in plan()
    summarize: Callable[[dict[str, PreparedSplit]], dict]  # the kind's summary, read back from the written splits
    chunk: int = 1  # sources per task handed to a worker (MNIST's samples are tiny: thousands per task)
    parallel: bool = True  # False where decoding costs less than sending the samples between processes (MNIST)


# The dataset kinds, each a module pipeline/datasets/<kind>.py with a PrepareParams and a plan(). A list,
# not whatever the name imports: "__init__" or "os" would import something that is no kind.
KINDS = ("folder", "mnist", "stare")
SHARD_BYTES_ENV = "SEGPIPE_SHARD_BYTES"  # a test hook: many small shards from a small dataset
SUMMARY_BATCH = 4096  # samples read at once (one read per array where they lie together) for the summaries
IN_FLIGHT_PER_PROCESS = 2  # decoded tasks waiting to be written, per worker: memory stays a few samples each


def dataset_kind(dataset: str) -> str:
    """The kind of ``dataset``, from params.yaml's ``datasets`` mapping (name: kind)."""
    datasets = read_params_file().get("datasets")
    where = f"{PARAMS_FILE}: datasets"
    if not isinstance(datasets, dict):
        raise ParamError(f"{where}: expected a mapping of dataset name to kind (mnist: mnist, leaves: folder), "
                         f"got {datasets!r:.60}")
    if dataset not in datasets:
        raise ParamError(f"{where}: no dataset {dataset!r} (datasets: {', '.join(map(str, datasets))})")
    kind = datasets[dataset]
    if not isinstance(kind, str) or kind not in KINDS:
        raise ParamError(f"{where}.{dataset}: no kind {kind!r:.60} (a kind is a module of pipeline/datasets/); "
                         f"kinds: {', '.join(KINDS)}")
    return kind


def recipe(kind: str, module, settings) -> str:
    """What every sample's content depends on besides its raw bytes: the kind, the version of its decoding and of
    the prepared format, and the params. A change to any of them makes every sample new.

    Versions, not the code's text: the fingerprints are stored in the index, and an edit that changes nothing
    prepare writes (a comment, a faster loop) must leave the output's bytes, and so every stage after it, as
    they are. A change to what a kind decodes bumps its ``VERSION``; one to the shards' layout, ``FORMAT``.
    """
    versions = {"kind": kind, "kind_version": module.VERSION, "format": prepared.FORMAT}
    return hashlib.sha256(json.dumps([versions, dataclasses.asdict(settings)], sort_keys=True,
                                     default=str).encode()).hexdigest()


def fingerprint(recipe_digest: str, split: str, source: Source) -> str:
    return hashlib.sha256(f"{recipe_digest}\0{split}\0{source.id}\0{source.digest}".encode()).hexdigest()


# The job of the forked workers: set before the pool forks, read by _decode_range in each worker.
_JOB: tuple[Callable[[Source], Sample], Sequence[Source]] | None = None


def _decode_range(start: int, stop: int) -> list[Sample]:
    decode, sources = _JOB
    return decode(sources[start:stop])


def decoded(decode: Callable[[Sequence[Source]], list[Sample]], sources: Sequence[Source], processes: int,
            chunk: int) -> Iterator[Sample]:
    """The samples ``decode`` makes of ``sources``, ``chunk`` at a time, in order, computed by ``processes`` forked
    workers; at most ``IN_FLIGHT_PER_PROCESS`` chunks per worker wait to be written, so memory is bounded by a few
    chunks."""
    global _JOB
    if processes <= 1 or len(sources) <= chunk:
        for start in range(0, len(sources), chunk):
            yield from decode(sources[start : start + chunk])
        return
    _JOB = (decode, sources)
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pending: collections.deque = collections.deque()
            for start in range(0, len(sources), chunk):
                pending.append(pool.apply_async(_decode_range, (start, min(start + chunk, len(sources)))))
                while len(pending) >= IN_FLIGHT_PER_PROCESS * processes:
                    yield from pending.popleft().get()
            while pending:
                yield from pending.popleft().get()
    finally:
        _JOB = None


def each(decode: Callable[[Source], Sample], sources: Sequence[Source]) -> list[Sample]:
    """A chunk's samples, decoded one by one: the ``Plan.decode`` of a kind whose images are decoded singly."""
    return [decode(source) for source in sources]


def decoding_processes() -> int:
    """One per usable core (the CPU affinity, which taskset and container limits narrow)."""
    return max(1, len(os.sched_getaffinity(0)))


def split_record(name: str, split: PreparedSplit) -> dict:
    """Images and the fraction of (field-of-view) pixels that are foreground, for any dataset."""
    foreground = counted = 0
    for _, samples in split.batches(SUMMARY_BATCH, ("mask", "fov")):
        for sample in samples:
            inside = sample.mask > 0
            if sample.fov is not None:
                inside &= sample.fov
            foreground += int(np.count_nonzero(inside))
            counted += sample.mask.size if sample.fov is None else int(np.count_nonzero(sample.fov))
    return {"split": name, "images": len(split), "foreground_fraction": round(foreground / max(counted, 1), 6)}


def write_plan(plan: Plan, directory: Path, recipe_digest: str, shard_bytes: int = prepared.SHARD_BYTES) -> int:
    """Decode and write ``plan``'s samples into ``directory``, keeping the shards there that still hold the same
    samples; returns how many samples were decoded (the others were kept)."""
    with PreparedWriter(directory, plan.meta, shard_bytes) as writer:
        todo: list[tuple[str, Source, str]] = []
        for name in SPLITS:
            prints = [fingerprint(recipe_digest, name, source) for source in plan.splits[name]]
            kept = writer.plan(name, prints)
            todo += [(name, s, p) for s, p in zip(plan.splits[name], prints) if p not in kept]
        samples = decoded(plan.decode, [source for _, source, _ in todo],
                          decoding_processes() if plan.parallel else 1, plan.chunk)
        for (name, _, print_), sample in zip(todo, samples):
            writer.add(name, sample, print_)
    return len(todo)


def summary(plan: Plan, directory: Path) -> dict:
    """data.json: images and foreground fraction per split (the list first: `dvc plots` draws a JSON file's
    first list, dvc.yaml), then the kind's own summary."""
    splits = open_splits(directory, verify=False)
    return {"splits": [split_record(name, split) for name, split in splits.items()], **plan.summarize(splits)}


def prepare(dataset: str) -> str:
    start = time.perf_counter()
    kind = dataset_kind(dataset)
    module = importlib.import_module(f"pipeline.datasets.{kind}")
    settings = load_params(dataset, "prepare", module.PrepareParams)
    paths = DatasetPaths(dataset)
    if not paths.raw.is_dir():
        raise StageError(f"{paths.raw}: not found; run the download stage first")
    plan: Plan = module.plan(paths.raw, settings)
    # The shard size is fixed (a param would make it part of every fingerprint); tests shrink it.
    shard_bytes = int(os.environ.get(SHARD_BYTES_ENV, prepared.SHARD_BYTES))
    decoded_count = write_plan(plan, paths.prepared, recipe(kind, module, settings), shard_bytes)
    data = summary(plan, paths.prepared)
    write_json(paths.metrics / "data.json", data)
    sizes = ", ".join(f"{record['split']} {record['images']}" for record in data["splits"])
    kept = sum(len(s) for s in plan.splits.values()) - decoded_count
    return (f"prepare {dataset}: {sizes} images ({decoded_count} decoded, {kept} kept) in "
            f"{time.perf_counter() - start:.1f} s -> {paths.prepared}")


if __name__ == "__main__":
    run(prepare)

"""The prepared format: the single contract between ``prepare`` and the dataset-agnostic stages.

``data/prepared/<dataset>/`` holds ``meta.json``, ``index.json`` and ``<split>-<sha256:16>.tar`` shards of ``.npy``
blocks, read with one positioned read per array; a damaged shard or index is one line naming the file.
Layout and reasons: docs/prepared-format.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.stage import StageError
from pipeline.tasks import TASKS

SPLITS = ("train", "val", "test")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT = "segpipe-shards/1"
INDEX = "index.json"
SHARD_BYTES = 256 * 2**20  # a shard closes before the sample that would take it past this
ROLES = {"image": np.dtype("u1"), "mask": np.dtype("u1"), "fov": np.dtype("?"), "reference": np.dtype("u1")}
MAX_SIDE = 1 << 16  # as the folder kind's own bound on decoded images
SHARD_NAME = re.compile(r"(train|val|test)-[0-9a-f]{16}\.tar")
# A batch of whole images stacked for prediction holds at most this many pixels (batch_size counts images).
BATCH_PIXELS = 2**23
MAX_INDEX_BYTES = 256 * 2**20  # about 5 million samples (some 48 bytes each)
FINGERPRINT_HEX = 16  # 64 bits of each sample's fingerprint in the index: enough to tell its samples apart
BLOCK_BYTES = 16 * 2**20  # samples gathered before a block is written: the writer's memory per split
# Loaders' advice to load a refused file unsafely: never repeated to a user whose file may be hostile.
UNSAFE_ADVICE = re.compile(r"weights_only|allow_pickle|safe_globals|allowlist|trust", re.IGNORECASE)


class PreparedDataError(StageError):
    """A prepared dataset is missing, malformed or inconsistent."""


def error_reason(error: BaseException) -> str:
    """The first sentence of the innermost error in the chain that is not advice to load the file unsafely."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    for sentence in re.split(r"(?<=\.)\s+|\n", str(error)):
        if sentence.strip() and not UNSAFE_ADVICE.search(sentence):
            return sentence.strip()
    return type(error).__name__


def check_zip(
    path: str | os.PathLike, limits: Iterable[tuple[str, float]], kind: str, error: type[StageError] = PreparedDataError
) -> list[zipfile.ZipInfo]:
    """The members of the zip (a torch file) at ``path``, each named by a pattern of ``limits``, held to its most
    bytes and stored uncompressed within the file, checked before any is read."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:  # reads the central directory, which lies within the file
            members = archive.infolist()
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile) as e:
        raise error(f"{path}: not a {kind} ({error_reason(e)})") from None
    patterns = [(re.compile(pattern), most) for pattern, most in limits]
    if len({m.filename for m in members}) != len(members):
        raise error(f"{path}: two members have the same name")
    for member in members:
        name = member.filename
        most = next((most for pattern, most in patterns if pattern.fullmatch(name)), None)
        if most is None:
            raise error(f"{path}: unexpected member {name} in a {kind}")
        if member.compress_type != zipfile.ZIP_STORED:
            raise error(f"{path}: member {name} is compressed; this file holds uncompressed members only")
        if member.file_size != member.compress_size or member.header_offset + member.file_size > size:
            raise error(f"{path}: member {name} declares {member.file_size:,} bytes; the file holds {size:,}")
        if member.file_size > most:
            raise error(f"{path}: member {name} holds {member.file_size:,} bytes; at most {most:,} in a {kind}")
    return members


@dataclass
class Sample:
    """One image and its masks, as a stage reads or prepare writes them."""

    id: str
    image: np.ndarray  # uint8 (H, W, C)
    mask: np.ndarray  # uint8 (H, W), class indices
    fov: np.ndarray | None = None  # bool (H, W): the pixels that count (None: all of them)
    reference: np.ndarray | None = None  # uint8 (H, W): a second annotator's mask

    def check(self, where: str, num_classes: int | None, roles: Iterable[str] = ("mask", "fov", "reference")) -> None:
        """Its id, dtypes and shapes; with ``num_classes``, its masks' values too."""
        if not ID_PATTERN.fullmatch(self.id):  # render names a file after each id: it must not name a path
            raise PreparedDataError(f"{where}: id {self.id!r} is not a plain name (letters, digits, '.', '_', '-')")
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or 0 in self.image.shape:
            raise PreparedDataError(
                f"{where}: image {self.id} must be uint8 (H, W, C) with no empty side, got "
                f"{self.image.dtype} {self.image.shape}"
            )
        for role in roles:
            array = getattr(self, role)
            if array is not None and (array.shape != self.image.shape[:2] or array.dtype != ROLES[role]):
                raise PreparedDataError(
                    f"{where}: {role} of {self.id} must be {ROLES[role]} {self.image.shape[:2]}, "
                    f"got {array.dtype} {array.shape}"
                )
            if array is not None and role != "fov" and num_classes is not None and array.max() >= num_classes:
                raise PreparedDataError(
                    f"{where}: {role} of {self.id} holds class {array.max()}; the dataset has {num_classes} classes"
                )


@dataclass
class Split:
    """A whole split in memory, images of one size stacked: for small datasets (tests, benchmarks) only."""

    images: np.ndarray  # uint8 (N, H, W, C)
    masks: np.ndarray  # uint8 (N, H, W), class indices
    ids: np.ndarray  # str (N,)
    fov: np.ndarray | None = None  # bool (N, H, W)
    reference_masks: np.ndarray | None = None  # uint8 (N, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def samples(self) -> Iterator[Sample]:
        for i in range(len(self)):
            fov = None if self.fov is None else self.fov[i]
            reference = None if self.reference_masks is None else self.reference_masks[i]
            yield Sample(str(self.ids[i]), self.images[i], self.masks[i], fov, reference)


# Class colours: black background, then matplotlib's tab10, so that plots and overlays agree.
TAB10 = "1f77b4 ff7f0e 2ca02c d62728 9467bd 8c564b e377c2 7f7f7f bcbd22 17becf"
TAB10_COLORS = [[0, 0, 0]] + [list(bytes.fromhex(color)) for color in TAB10.split()]


@dataclass
class DatasetMeta:
    name: str
    task: str  # "multiclass": softmax over len(classes); "binary": one logit, class 1 is positive
    classes: list[str]
    colors: list[list[int]]  # RGB 0-255, one per class, for overlays
    scale: float = 1.0  # the resize factor prepare applied to every image (a folder kind's prepare.scale)

    MAX_SCALE = 16  # as the folder kind's prepare.scale allows

    def to_dict(self) -> dict:
        """meta.json's content: ``scale`` only where it is not 1 (the file of a dataset that predates it)."""
        data = dict(vars(self))
        if self.scale == 1:
            del data["scale"]
        return data

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def model_outputs(self) -> int:
        return TASKS[self.task].model_outputs(self.num_classes)

    def check(self, where: str) -> None:
        if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
            raise PreparedDataError(f"{where}: classes must be a list of names, got {self.classes!r:.60}")
        if not isinstance(self.colors, list) or not all(
            isinstance(c, list) and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in self.colors
        ):
            raise PreparedDataError(f"{where}: colors must be a list of [r, g, b] in 0-255, got {self.colors!r:.60}")
        if self.task not in TASKS:
            raise PreparedDataError(f"{where}: task must be one of {tuple(TASKS)}, got {self.task!r}")
        if len(self.colors) != len(self.classes) or any(len(c) != 3 for c in self.colors):
            raise PreparedDataError(f"{where}: need one RGB colour per class")
        required = TASKS[self.task].classes
        if required is not None and len(self.classes) != required:
            raise PreparedDataError(f"{where}: a {self.task} task has exactly {required} classes, got {self.classes}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= self.MAX_SCALE:
            raise PreparedDataError(f"{where}: scale must be a number in (0, {self.MAX_SCALE}], got {scale!r:.60}")


def load_meta(directory: str | os.PathLike) -> DatasetMeta:
    path = Path(directory) / "meta.json"
    try:
        meta = DatasetMeta(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: not found; run the prepare stage first") from None
    except (OSError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreparedDataError(f"{path}: not a valid dataset description: {e}") from None
    meta.check(str(path))
    return meta


# ------------------------------------------------------------------------------------------ writing


class _ShardWriter:
    """One shard being written: a deterministic tar of blocks (docs/prepared-format.md), hashed on the way."""

    def __init__(self, directory: Path, split: str, number: int, block_bytes: int, num_classes: int, where: str):
        self.path = directory / f".{split}-{number:06d}.partial"
        self.split, self.block_bytes, self.num_classes, self.where = split, block_bytes, num_classes, where
        self.file = open(self.path, "wb")
        self.sha256 = hashlib.sha256()
        self.offset = 0  # bytes written
        self.blocks: list[dict] = []
        self.pending: list[tuple[Sample, str]] = []  # the block being gathered
        self.pending_bytes = self.owned = 0

    def add(self, sample: Sample, fingerprint: str, size: int, layout: tuple) -> None:
        if self.pending and (self.pending_layout != layout or self.pending_bytes + size > self.block_bytes):
            self.flush()
        self.pending.append((sample, fingerprint))
        self.pending_bytes += size
        self.pending_layout = layout
        if self.pending_bytes + size > self.block_bytes:  # full: no further sample of this size would fit
            self.flush()

    def own_pending(self) -> None:
        """Copy the gathered arrays that are views of memory their owner will reuse."""
        for sample, _ in self.pending[self.owned :]:
            for role in ROLES:
                array = getattr(sample, role)
                if array is not None and not array.flags.owndata:
                    setattr(sample, role, array.copy())
        self.owned = len(self.pending)

    def _write(self, data) -> None:
        self.sha256.update(data)
        self.file.write(data)
        self.offset += memoryview(data).nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        samples = [sample for sample, _ in self.pending]
        first = samples[0]
        block = {
            "ids": [s.id for s in samples],
            "fingerprints": [f[:FINGERPRINT_HEX] for _, f in self.pending],
            "size": [int(first.image.shape[0]), int(first.image.shape[1])],
            "scored": any(s.fov is None or bool(s.fov.any()) for s in samples),  # a split with none is refused
        }
        for role in ROLES:
            if getattr(first, role) is None:
                continue
            shape = (len(samples), *getattr(first, role).shape)
            header = io.BytesIO()
            descr = np.lib.format.dtype_to_descr(ROLES[role])
            np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
            info = tarfile.TarInfo(f"{first.id}.{role}.npy")
            info.size, info.mode, info.mtime = header.tell() + math.prod(shape) * ROLES[role].itemsize, 0o444, 0
            self._write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
            self._write(header.getvalue())
            block[role] = self.offset
            # Many small samples stacked first (one write, not one per sample); a large one as it lies.
            data = np.stack([getattr(s, role) for s in samples]) if len(samples) > 1 else getattr(first, role)
            if role in ("mask", "reference") and data.max() >= self.num_classes:  # one check of the block
                for sample in samples:
                    sample.check(self.where, self.num_classes, (role,))
            self._write(np.ascontiguousarray(data, dtype=ROLES[role]).reshape(-1).view(np.uint8))
            self._write(bytes(-info.size % tarfile.BLOCKSIZE))
        self.blocks.append(block)
        self.pending, self.pending_bytes, self.owned = [], 0, 0

    def close(self) -> dict:
        """Finish the tar as tarfile ends one, name it after its sha256; its entry in the index."""
        self.flush()
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.offset % tarfile.RECORDSIZE))
        self.file.close()
        digest = self.sha256.hexdigest()
        name = f"{self.split}-{digest[:16]}.tar"
        os.replace(self.path, self.path.with_name(name))
        return {"file": name, "bytes": self.offset, "sha256": digest, "blocks": self.blocks}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PreparedWriter:
    """Writes a prepared dataset into ``directory`` atomically: ``plan`` each split's fingerprints, ``add`` the
    samples not kept from the previous version's shards, in that order, then leave the block."""

    def __init__(
        self,
        directory: str | os.PathLike,
        meta: DatasetMeta,
        shard_bytes: int = SHARD_BYTES,
        block_bytes: int = BLOCK_BYTES,
    ):
        meta.check(str(directory))
        self.directory, self.meta = Path(directory), meta
        self.shard_bytes, self.block_bytes = shard_bytes, min(block_bytes, shard_bytes)
        self._previous, self._previous_channels = _previous_shards(self.directory)
        self._shards: dict[str, list[dict]] = {split: [] for split in SPLITS}  # kept ones first (plan precedes add)
        self._open: dict[str, _ShardWriter] = {}
        self._planned: dict[str, list[str]] = {}
        self._seen: dict[str, set[str]] = {split: set() for split in SPLITS}
        self._channels: int | None = None
        self._roles: dict[str, tuple] = {}
        self._numbers = 0

    def __enter__(self) -> PreparedWriter:
        self._atomic = atomic_path(self.directory)
        self.tmp = self._atomic.__enter__()
        self.tmp.mkdir()
        return self

    def plan(self, split: str, fingerprints: list[str]) -> set[str]:
        """Declare ``split``'s samples by fingerprint; returns those already held by kept shards."""
        if split not in SPLITS:
            raise PreparedDataError(f"no split {split!r}; the splits are {SPLITS}")
        self._planned[split] = [f[:FINGERPRINT_HEX] for f in fingerprints]
        short = {f[:FINGERPRINT_HEX]: f for f in fingerprints}
        kept: set[str] = set()
        for shard in self._previous.get(split, []):
            prints = [p for block in shard["blocks"] for p in block["fingerprints"]]
            if prints and all(p in short and short[p] not in kept for p in prints):
                try:
                    os.link(self.directory / shard["file"], self.tmp / shard["file"])
                except OSError:
                    shutil.copyfile(self.directory / shard["file"], self.tmp / shard["file"])
                self._shards[split].append(shard)
                kept |= {short[p] for p in prints}
        return kept

    def add(self, split: str, sample: Sample, fingerprint: str) -> None:
        where = f"{self.directory}/{split}"
        sample.check(where, None)  # the masks' values: once a block, as it is written
        if sample.id in self._seen[split]:
            raise PreparedDataError(f"{where}: id {sample.id!r} appears twice")
        self._seen[split].add(sample.id)
        channels = sample.image.shape[2]
        if self._channels is not None and channels != self._channels:
            raise PreparedDataError(f"{where}: image {sample.id} has {channels} channels, the others {self._channels}")
        self._channels = channels
        size = sample.image.nbytes + sample.mask.nbytes
        size += sum(array.nbytes for array in (sample.fov, sample.reference) if array is not None)
        roles = (sample.fov is not None, sample.reference is not None)
        if self._roles.setdefault(split, roles) != roles:
            have = [role for role in ROLES if getattr(sample, role) is not None]
            raise PreparedDataError(f"{where}: sample {sample.id} has {have}, unlike the split's others")
        shard = self._open.get(split)
        if (
            shard is not None
            and (shard.blocks or shard.pending)
            and shard.offset + shard.pending_bytes + size > self.shard_bytes
        ):
            self._shards[split].append(shard.close())
            shard = None
        if shard is None:
            self._numbers += 1
            shard = self._open[split] = _ShardWriter(
                self.tmp, split, self._numbers, self.block_bytes, self.meta.num_classes, where
            )
        shard.add(sample, fingerprint, size, (sample.image.shape, *roles))

    def own_pending(self) -> None:
        """Copy what the open shards still gather out of memory the caller will reuse (see _ShardWriter)."""
        for shard in self._open.values():
            shard.own_pending()

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._finish()
        except BaseException:
            exc = sys.exc_info()
            raise
        finally:
            for shard in self._open.values():
                shard.file.close()
            self._atomic.__exit__(*exc)

    def _finish(self) -> None:
        for split, shard in self._open.items():
            self._shards[split].append(shard.close())
        self._open = {}
        splits = {}
        for split in SPLITS:
            shards = splits[split] = self._shards[split]
            held = [p for shard in shards for block in shard["blocks"] for p in block["fingerprints"]]
            if sorted(held) != sorted(self._planned.get(split, held)):
                planned = len(self._planned.get(split, []))
                raise PreparedDataError(f"{self.directory}/{split}: {len(held)} samples written, {planned} planned")
            _check_split(f"{self.directory}/{split}", split, shards, len(held))
        index = {"format": FORMAT, "channels": self._channels or self._previous_channels, "splits": splits}
        (self.tmp / "meta.json").write_text(json.dumps(self.meta.to_dict(), indent=2) + "\n")
        (self.tmp / INDEX).write_text(json.dumps(index, separators=(",", ":")) + "\n")


def _previous_shards(directory: Path) -> tuple[dict[str, list[dict]], int]:
    """The intact shards of the dataset now in ``directory``, by split, and its channels (none if it is not one)."""
    try:
        index = _read_index(directory)
    except (PreparedDataError, FileNotFoundError):
        return {}, 0

    def intact(shard: dict) -> bool:
        path = directory / shard["file"]
        try:
            return path.stat().st_size == shard["bytes"] and file_sha256(path) == shard["sha256"]
        except OSError:
            return False

    return {split: list(filter(intact, shards)) for split, shards in index["splits"].items()}, index["channels"]


def save_prepared(
    directory: str | os.PathLike, meta: DatasetMeta, splits: dict[str, Split], shard_bytes: int = SHARD_BYTES
) -> None:
    """Write a prepared dataset from splits in memory (small data: tests, benchmarks)."""
    if set(splits) != set(SPLITS):
        raise PreparedDataError(f"need splits {SPLITS}, got {sorted(splits)}")
    write_samples(directory, meta, {name: list(split.samples()) for name, split in splits.items()}, shard_bytes)


def write_samples(
    directory: str | os.PathLike,
    meta: DatasetMeta,
    splits: dict[str, list[Sample]],
    shard_bytes: int = SHARD_BYTES,
    block_bytes: int = BLOCK_BYTES,
) -> None:
    """Write a prepared dataset from samples in memory, fingerprinted by their arrays (a split left out is empty)."""
    with PreparedWriter(directory, meta, shard_bytes, block_bytes) as writer:
        for name in SPLITS:
            samples = splits.get(name, [])
            prints = [sample_fingerprint(name, s) for s in samples]
            kept = writer.plan(name, prints)
            for sample, fingerprint in zip(samples, prints):
                if fingerprint not in kept:
                    writer.add(name, sample, fingerprint)


def sample_fingerprint(split: str, sample: Sample) -> str:
    """A fingerprint of a sample's arrays themselves (for samples that have no raw bytes to name them by)."""
    digest = hashlib.sha256(f"{split}\0{sample.id}".encode())
    for role in ROLES:
        array = getattr(sample, role)
        digest.update(role.encode() + (b"-" if array is None else str(array.shape).encode() + array.tobytes()))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ reading


def _read_index(directory: Path) -> dict:
    """index.json, its structure checked (not yet against the shards' bytes)."""
    path = directory / INDEX
    if not path.is_file():
        raise FileNotFoundError(path)
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:  # parsed whole: its size bounds the memory it takes
        raise PreparedDataError(
            f"{path}: {size:,} bytes; an index holds at most {MAX_INDEX_BYTES:,} (about "
            f"{MAX_INDEX_BYTES // 48:,} samples); the index is damaged: run the prepare stage again"
        )
    try:
        index = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:  # its own message says where (its chain ends in json's internals)
        raise PreparedDataError(f"{path}: not a readable index ({e})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise PreparedDataError(f"{path}: not a readable index ({error_reason(e)})") from None

    def bad(what: str) -> PreparedDataError:
        return PreparedDataError(f"{path}: {what}; the index is damaged: run the prepare stage again")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} index")
    channels, splits = index.get("channels"), index.get("splits")
    if not _is_int(channels) or not 1 <= channels <= 4:
        raise bad(f"channels {channels!r:.40}")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        raise bad(f"splits must be {list(SPLITS)}")
    files: set[str] = set()
    for split, shards in splits.items():
        if not isinstance(shards, list):
            raise bad(f"split {split} is not a list of shards")
        ids: list[str] = []
        for shard in shards:
            name = shard.get("file") if isinstance(shard, dict) else None
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name) or name in files:
                raise bad(f"a shard of split {split} has no valid, unique file name")
            files.add(name)
            _check_shard(shard, channels, bad)
            ids += [i for block in shard["blocks"] for i in block["ids"]]
        if len(set(ids)) != len(ids):
            raise bad(f"an id appears twice in split {split}")
    return index


def _check_split(where: str, name: str, shards: list[dict], images: int) -> None:
    """Refuse an empty train or test split, and a split none of whose pixels counts (its fov all false)."""
    if name != "val" and not images:  # an empty validation split is allowed (everything trains)
        raise PreparedDataError(f"{where}: holds no images; the {name} split needs at least one")
    if images and not any(block["scored"] for shard in shards for block in shard["blocks"]):
        raise PreparedDataError(
            f"{where}: no pixel of its {images} images is valid (its fov is all false); nothing to train on or score"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shard(shard: dict, channels: int, bad) -> None:
    """A shard's size, sha256 and blocks (ids, fingerprints, size, offsets), its arrays within it and apart."""
    name, size, blocks, sha256 = shard["file"], shard.get("bytes"), shard.get("blocks"), shard.get("sha256")
    if not _is_int(size) or size < 0 or not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise bad(f"shard {name}: bytes or sha256 missing")
    if not isinstance(blocks, list) or not blocks:
        raise bad(f"shard {name}: no blocks")
    spans = []
    for block in blocks:
        ids, prints, hw = block.get("ids"), block.get("fingerprints"), block.get("size")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and ID_PATTERN.fullmatch(i) for i in ids):
            raise bad(f"shard {name}: a block's ids must be a non-empty list of plain names")
        if not isinstance(prints, list) or len(prints) != len(ids) or not all(isinstance(p, str) for p in prints):
            raise bad(f"shard {name}: one fingerprint per id needed")
        if not (isinstance(hw, list) and len(hw) == 2 and all(_is_int(v) and 1 <= v <= MAX_SIDE for v in hw)):
            raise bad(f"shard {name}: a block's size must be [height, width], sides 1-{MAX_SIDE}")
        if "image" not in block or "mask" not in block or not isinstance(block.get("scored"), bool):
            raise bad(f"shard {name}: a block without images, masks or whether any pixel counts")
        for role in (role for role in ROLES if role in block):
            offset, nbytes = block[role], len(ids) * _array_bytes(role, hw, channels)
            if not _is_int(offset) or offset < 0 or offset + nbytes > size:
                raise bad(f"shard {name}: the {role} block of {ids[0]} lies outside the shard")
            spans.append((offset, offset + nbytes))
    spans.sort()
    if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
        raise bad(f"shard {name}: two blocks overlap")


def _array_bytes(role: str, size: list[int] | tuple[int, int], channels: int) -> int:
    return size[0] * size[1] * (channels if role == "image" else 1) * ROLES[role].itemsize


class PreparedSplit:
    """One split of a prepared dataset, read in the order of its ids by ``os.preadv`` (a forked worker: its own)."""

    def __init__(self, directory: Path, name: str, meta: DatasetMeta, index: dict):
        self.directory, self.name, self.meta = directory, name, meta
        self.channels: int = index["channels"]
        shards = index["splits"][name]
        self._files = [shard["file"] for shard in shards]
        self._blocks = [(s, block) for s, shard in enumerate(shards) for block in shard["blocks"]]
        where = [(b, k) for b, (_, block) in enumerate(self._blocks) for k in range(len(block["ids"]))]
        ids = [i for _, block in self._blocks for i in block["ids"]]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self.ids: list[str] = [ids[k] for k in order]
        self._where: list[tuple[int, int]] = [where[k] for k in order]  # (block, position in the block)
        self.sizes: list[tuple[int, int]] = [tuple(self._blocks[b][1]["size"]) for b, _ in self._where]
        self.has_fov = any("fov" in block for _, block in self._blocks)
        self.has_reference = any("reference" in block for _, block in self._blocks)
        self._descriptors: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def where(self) -> str:
        return f"{self.directory}/{self.name}"

    @property
    def largest(self) -> tuple[int, int]:
        """The largest height and the largest width (of possibly different images); (0, 0) when empty."""
        return (max((h for h, _ in self.sizes), default=0), max((w for _, w in self.sizes), default=0))

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) <= 1

    def _read(self, shard: int, offset: int, shape: tuple[int, ...], role: str) -> np.ndarray:
        if os.getpid() != self._pid:  # a forked worker: descriptors of its own
            self._descriptors, self._pid = {}, os.getpid()
        path = self.directory / self._files[shard]
        if shard not in self._descriptors:
            try:
                self._descriptors[shard] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise PreparedDataError(f"{path}: cannot be read ({e.strerror})") from None
        out = np.empty(shape, dtype=np.uint8)  # every role's dtype is one byte; a bool fov is viewed at the end
        view, done = memoryview(out.reshape(-1)), 0
        while done < len(view):
            got = os.preadv(self._descriptors[shard], [view[done:]], offset + done)
            if got == 0:
                raise PreparedDataError(
                    f"{path}: truncated (a sample's data ends past the file's end); run the prepare stage again"
                )
            done += got
        if role == "fov":
            if out.max(initial=0) > 1:
                raise PreparedDataError(f"{path}: a field of view holds values other than 0 and 1")
            return out.view(np.bool_)
        if role != "image" and out.max(initial=0) >= self.meta.num_classes:
            raise PreparedDataError(
                f"{path}: a {role} holds class {out.max()}; the dataset has {self.meta.num_classes} classes"
            )
        return out

    def _read_run(self, start: int, stop: int, roles: Iterable[str]) -> list[Sample]:
        """Samples ``start`` to ``stop``, which lie one after the other in one block: one read per array."""
        b, k = self._where[start]
        shard, block = self._blocks[b]
        (h, w), c, n = block["size"], self.channels, stop - start
        arrays: dict[str, np.ndarray] = {}
        for role in roles:
            if role in block:
                shape = (n, h, w, c) if role == "image" else (n, h, w)
                arrays[role] = self._read(shard, block[role] + k * _array_bytes(role, (h, w), c), shape, role)
        image, mask = arrays.get("image"), arrays.get("mask")
        return [
            Sample(
                self.ids[start + j],
                image[j] if image is not None else np.empty((h, w, c), np.uint8),
                mask[j] if mask is not None else np.empty((h, w), np.uint8),
                arrays["fov"][j] if "fov" in arrays else None,
                arrays["reference"][j] if "reference" in arrays else None,
            )
            for j in range(n)
        ]

    def read(self, i: int, roles: Iterable[str] = tuple(ROLES)) -> Sample:
        """Sample ``i`` (its ``roles`` only: an image or mask left out is an empty array, the others None)."""
        return self._read_run(i, i + 1, roles)[0]

    def __iter__(self) -> Iterator[Sample]:
        for _, samples in self.batches(256):
            yield from samples

    def runs(self, batch_size: int) -> list[range]:
        """Runs of consecutive samples of one size, at most ``batch_size`` and BATCH_PIXELS (one image at least)."""
        runs, start = [], 0
        while start < len(self):
            h, w = self.sizes[start]
            most = max(1, min(batch_size, BATCH_PIXELS // (h * w)))
            stop = start + 1
            while stop < len(self) and stop - start < most and self.sizes[stop] == self.sizes[start]:
                stop += 1
            runs.append(range(start, stop))
            start = stop
        return runs

    def read_many(self, indices: Iterable[int], roles: Iterable[str] = tuple(ROLES)) -> list[Sample]:
        """Samples ``indices``; those that lie one after the other in a block are read at once."""
        runs: list[list[int]] = []
        for i in indices:
            block, k = self._where[i - 1]
            if runs and runs[-1][-1] == i - 1 and self._where[i] == (block, k + 1):
                runs[-1].append(i)
            else:
                runs.append([i])
        return [sample for run in runs for sample in self._read_run(run[0], run[-1] + 1, roles)]

    def batches(self, batch_size: int, roles: Iterable[str] = tuple(ROLES)) -> Iterator[tuple[list[int], list[Sample]]]:
        """:meth:`runs`, read: ``(indices, samples)`` of one size, at most ``batch_size`` at a time."""
        for run in self.runs(batch_size):
            yield list(run), self.read_many(run, roles)

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def open_splits(
    directory: str | os.PathLike, names: Iterable[str] = SPLITS, verify: bool = True
) -> dict[str, PreparedSplit]:
    """Splits of a prepared dataset, their shards' sizes (``verify``: and sha256s) checked against the index."""
    directory = Path(directory)
    meta = load_meta(directory)
    try:
        index = _read_index(directory)
    except FileNotFoundError:
        raise PreparedDataError(f"{directory / INDEX}: not found; run the prepare stage first") from None
    out = {}
    for name in names:
        for shard in index["splits"][name]:
            path = directory / shard["file"]
            try:
                size = path.stat().st_size
            except OSError as e:
                raise PreparedDataError(f"{path}: cannot be read ({e.strerror}); run the prepare stage again") from None
            if size != shard["bytes"]:
                raise PreparedDataError(
                    f"{path}: {size:,} bytes, the index records {shard['bytes']:,}: truncated or "
                    "replaced; run the prepare stage again"
                )
            if verify and file_sha256(path) != shard["sha256"]:
                raise PreparedDataError(
                    f"{path}: its sha256 differs from the index's: the shard was changed; run the prepare stage again"
                )
        split = out[name] = PreparedSplit(directory, name, meta, index)
        _check_split(split.where, name, index["splits"][name], len(split))
    return out


def open_split(directory: str | os.PathLike, name: str, verify: bool = True) -> PreparedSplit:
    """One split (see open_splits)."""
    return open_splits(directory, [name], verify)[name]


def dataset_digest(directory: str | os.PathLike) -> str:
    """What identifies a prepared dataset's content: its meta and index (which holds every shard's sha256)."""
    digest = hashlib.sha256()
    for name in ("meta.json", INDEX):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()


def load_split(directory: str | os.PathLike, name: str) -> Split:
    """A whole split in memory, its images stacked (small datasets of one image size: tests, benchmarks)."""
    split = open_split(directory, name)
    if not split.uniform:
        raise PreparedDataError(
            f"{split.where}: images of {len(set(split.sizes))} sizes cannot be stacked; read "
            "them one by one (open_split)"
        )
    h, w = split.sizes[0] if len(split) else (0, 0)
    samples = list(split)
    images = np.stack([s.image for s in samples]) if samples else np.zeros((0, h, w, split.channels), np.uint8)
    masks = np.stack([s.mask for s in samples]) if samples else np.zeros((0, h, w), np.uint8)
    fov = np.stack([s.fov for s in samples]) if samples and split.has_fov else None
    reference = np.stack([s.reference for s in samples]) if samples and split.has_reference else None
    return Split(images, masks, np.array(split.ids, dtype=str), fov, reference)

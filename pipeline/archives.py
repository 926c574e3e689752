"""Reading gzip files and tar, compressed tar and zip archives in bounded memory; nothing is extracted to disk.

A file's kind follows from its name; members are refused by their headers before their bodies are read, and a
:class:`Budget` caps what unpacking a file may produce. Threat model and why: docs/download.md.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pipeline.stage import StageError

CHUNK_SIZE = 1 << 20  # bytes per read: what a streaming reader holds, whatever the size of the file
PLAIN, GZIP, TAR, TAR_GZ, ZIP = "plain", "gzip", "tar", "tar.gz", "zip"  # the kinds of file
ARCHIVES = (TAR, TAR_GZ, ZIP)
KIND_NAMES = {PLAIN: "a plain file", GZIP: "a gzip file", TAR: "a tar archive", ZIP: "a zip archive"}
KIND_NAMES[TAR_GZ] = "a compressed tar archive"
_SUFFIXES = ((".tar.gz", TAR_GZ), (".tgz", TAR_GZ), (".tar", TAR), (".zip", ZIP), (".gz", GZIP))  # longest first
# Besides their own errors, the decoders raise these on hostile bytes (a malformed PAX record, a zip version).
DECODER_ERRORS = (
    *(tarfile.TarError, zipfile.BadZipFile, zlib.error, struct.error, OSError, EOFError),
    *(ValueError, LookupError, ArithmeticError, NotImplementedError),
)


class ArchiveError(StageError):
    """A file or archive is corrupt, truncated, too large or has a member it must not have."""


def file_kind(name: str) -> str:
    return next((kind for suffix, kind in _SUFFIXES if name.lower().endswith(suffix)), PLAIN)


def member_kind(name: str) -> str:
    """GZIP or PLAIN: a member archive is not opened."""
    return GZIP if name.lower().endswith(".gz") else PLAIN


def escapes(name: str) -> bool:
    """Whether ``name`` is no relative POSIX path inside its folder: absolute, ``..``, a backslash, or empty."""
    path = PurePosixPath(name)
    return path.is_absolute() or name.startswith("/") or ".." in path.parts or "\\" in name or not path.parts


class Budget:
    """What unpacking one file may produce, ``limit`` bytes (None: any), every decompressor's output counted."""

    def __init__(self, name: str, limit: int | None = None):
        self.name, self.limit, self.used = name, limit, 0

    def take(self, size: int) -> None:
        self.used += size
        if self.limit is not None and self.used > self.limit:
            raise ArchiveError(f"{self.name}: decompresses to more than {self.limit:,} bytes (stopped there)")


def _invalid(name: str, what: str, error: Exception) -> ArchiveError:
    return ArchiveError(f"{name}: not a valid {what} ({str(error) or type(error).__name__})")


def gunzip(data: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(data)
    except DECODER_ERRORS as e:
        raise _invalid(name, "gzip file", e) from None


def gunzip_chunks(stream: BinaryIO, name: str, budget: Budget | None = None) -> Iterator[bytes]:
    """A gzip stream's content, CHUNK_SIZE bytes at a time, each taken from ``budget`` before it is yielded."""
    budget = budget or Budget(name)
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as content:
            while chunk := content.read(CHUNK_SIZE):
                budget.take(len(chunk))
                yield chunk
    except DECODER_ERRORS as e:
        raise _invalid(name, "gzip file", e) from None


class _Counted:
    """The tar that a compressed tar inflates to, its reads taken from a budget."""

    def __init__(self, stream: BinaryIO, budget: Budget):
        self.stream, self.budget = stream, budget

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.budget.take(len(data))
        return data


def _top_folder(name: str) -> bool:
    return name != "" and not PurePosixPath(name).parts  # "./", as `tar -C dir .` writes it: skipped


def _tar_members(path: Path, label: str, compressed: bool, budget: Budget) -> Iterator[tuple[str, int, BinaryIO]]:
    with contextlib.ExitStack() as stack:
        if compressed:  # stream mode: read once, front to back
            content = _Counted(stack.enter_context(gzip.GzipFile(path, "rb")), budget)
            tar = stack.enter_context(tarfile.open(fileobj=content, mode="r|"))
        else:
            tar = stack.enter_context(tarfile.open(path, mode="r:"))
        for info in tar:
            if escapes(info.name) and not (info.isdir() and _top_folder(info.name)):
                raise ArchiveError(f"{label}: refusing member {info.name!r}: absolute or escaping path")
            if info.issparse():  # its header may claim gigabytes that the archive does not hold
                raise ArchiveError(f"{label}: refusing member {info.name!r}: a sparse file")
            if not info.isfile() and not info.isdir():
                raise ArchiveError(f"{label}: refusing member {info.name!r}: not a regular file (link or device)")
            if info.isfile():
                yield info.name, info.size, tar.extractfile(info)


def _zip_members(path: Path, label: str, budget: Budget) -> Iterator[tuple[str, int, BinaryIO]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name, file_type = info.filename, stat.S_IFMT(info.external_attr >> 16)  # the Unix mode, if recorded
            if file_type == stat.S_IFLNK:
                raise ArchiveError(f"{label}: refusing member {name!r}: a symbolic link")
            if escapes(name) and not _top_folder(name):
                raise ArchiveError(f"{label}: refusing member {name!r}: absolute or escaping path")
            if info.is_dir() or file_type == stat.S_IFDIR:
                continue
            if file_type not in (0, stat.S_IFREG):
                raise ArchiveError(f"{label}: refusing member {name!r}: not a regular file (link or device)")
            if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
                raise ArchiveError(f"{label}: refusing member {name!r}: encrypted")
            # zipfile inflates bzip2 and LZMA without a cap on what one read produces; deflate, a chunk at a time.
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                why = f"compression method {info.compress_type} (only stored and deflated members are read)"
                raise ArchiveError(f"{label}: refusing member {name!r}: {why}")
            budget.take(info.file_size)  # zipfile gives no more than a member declares (else its CRC fails)
            with archive.open(info) as body:
                yield name, info.file_size, body


def walk_archive(path: str | Path, kind: str, visit: Callable, *, label: str | None = None, budget=None) -> None:
    """``visit(name, size its header declares, unread body)`` each regular member that passed the checks, in
    order (``./a.gz`` is ``a.gz``); errors name the archive as ``label``."""
    path = Path(path)
    label = label or path.name
    budget, names = budget or Budget(label), set()
    members = _zip_members(path, label, budget) if kind == ZIP else _tar_members(path, label, kind == TAR_GZ, budget)
    try:
        for name, size, body in members:
            if (name := str(PurePosixPath(name))) in names:
                raise ArchiveError(f"{label}: member {name!r} appears twice")
            names.add(name)
            visit(name, size, body)
    except DECODER_ERRORS as e:
        raise _invalid(label, "zip archive" if kind == ZIP else "tar archive", e) from None


def unpacked_size(path: str | Path, name: str, limit: int | None = None) -> int:
    """The bytes that unpacking the file at ``path`` (its ``name`` says its kind) produces, every decompressor's
    output counted; an ArchiveError past ``limit``, or for a member that the checks refuse."""
    kind, budget = file_kind(name), Budget(name, limit)

    def inflate(member: str, size: int, body: BinaryIO) -> None:  # every body read once: a zip's CRC-32s checked
        if member_kind(member) == GZIP:
            collections.deque(gunzip_chunks(body, f"{name}: member {member}", budget), maxlen=0)
        else:  # read(n): zipfile inflates at most n bytes a call
            collections.deque(iter(lambda: body.read(CHUNK_SIZE), b""), maxlen=0)

    if kind in ARCHIVES:
        walk_archive(path, kind, inflate, label=name, budget=budget)
    elif kind == GZIP:
        with open(path, "rb") as stream:
            collections.deque(gunzip_chunks(stream, name, budget), maxlen=0)
    return budget.used


def _read_body(body: BinaryIO, size: int, where: str) -> bytes:
    if len(data := body.read()) != size:
        raise ArchiveError(f"{where} is truncated")
    return data


def read_tar_members(path: str | Path) -> dict[str, bytes]:
    """All members of a tar archive as ``{name: bytes}``, with the checks of :func:`walk_archive`."""
    path, members = Path(path), {}

    def keep(name: str, size: int, body: BinaryIO) -> None:
        members[name] = _read_body(body, size, f"{path.name}: member {name!r}")

    walk_archive(path, TAR, keep)
    return members


def list_files(directory: str | Path) -> list[str]:
    """The files under ``directory``, as sorted POSIX paths relative to it; a link to a file counts as the file
    (DVC may link its cache into the workspace), a link to a folder is not followed."""
    directory = Path(directory)

    def fail(error: OSError) -> None:
        raise StageError(f"{error.filename}: cannot be read ({error.strerror or error})")

    names = []
    for root, _, files in os.walk(directory, onerror=fail):
        names += [(Path(root) / f).relative_to(directory).as_posix() for f in files if (Path(root) / f).is_file()]
    return sorted(names)


class RawTree:
    """A downloaded dataset directory with archives opened as folders. ``names``: each plain file as it is, a gzip
    file by its content (``x/im.ppm.gz`` is ``x/im.ppm``), each regular member of an archive under the archive's
    name, a gzip member by its content (``stare-images.tar/im0001.ppm``). Two sources of one name are an error."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._sources: dict[str, tuple[str, str | None]] = {}  # name: (file, member or None for the file itself)
        for file in list_files(self.directory):
            if (kind := file_kind(file)) in ARCHIVES:
                label = str(self.directory / file)
                walk_archive(self.directory / file, kind, lambda m, size, body: self._add(file, m), label=label)
            else:
                self._add(file, None)
        self.names: list[str] = sorted(self._sources)

    def _add(self, file: str, member: str | None) -> None:
        inner = member if member is not None else file
        name = (f"{file}/" if member is not None else "") + (inner[:-3] if member_kind(inner) == GZIP else inner)
        if name in self._sources:
            described = [f if m is None else f"{f}: member {m}" for f, m in (self._sources[name], (file, member))]
            raise ArchiveError(f"{self.directory}: {name!r} is both {described[0]} and {described[1]}")
        self._sources[name] = (file, member)

    def read(self, names: Iterable[str]) -> dict[str, bytes]:
        """``{name: content}`` for each of ``names``, in their order, opening each archive once."""
        names, wanted = list(names), {}  # wanted: {file: {member (None: the file itself): name}}
        for name in names:
            if name not in self._sources:
                raise ArchiveError(f"{self.directory}: no file or archive member makes {name!r}")
            file, member = self._sources[name]
            wanted.setdefault(file, {})[member] = name
        contents = {}
        for file, members in wanted.items():
            path, kind = self.directory / file, file_kind(file)
            if kind in ARCHIVES:
                contents.update(self._read_archive(path, kind, members))
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ArchiveError(f"{path}: cannot be read ({e.strerror or e})") from None
            contents[members[None]] = gunzip(data, str(path)) if kind == GZIP else data
        return {name: contents[name] for name in names}

    def _read_archive(self, path: Path, kind: str, members: dict[str | None, str]) -> dict[str, bytes]:
        found = {}

        def keep(member: str, size: int, body: BinaryIO) -> None:
            if member in members:
                data = _read_body(body, size, where := f"{path}: member {member}")
                found[members[member]] = gunzip(data, where) if member_kind(member) == GZIP else data

        walk_archive(path, kind, keep, label=str(path))
        if missing := sorted(set(members.values()) - set(found)):
            raise ArchiveError(f"{path}: members missing from the archive: {missing}")
        return found

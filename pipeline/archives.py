"""Reading plain files, gzip files and tar, compressed tar and zip archives from untrusted sources, in bounded
memory, without extracting anything.

Nothing from an archive is ever written to disk under a name the archive chose, so path traversal is
impossible by construction; the checks below still refuse hostile or malformed members outright (absolute or
escaping names, links, devices, sparse files, encrypted members, a name twice), so a bad archive is reported
rather than quietly half-used.

What a file is follows from its name alone (:func:`file_kind`): ``.zip``, ``.tar``, ``.tar.gz`` / ``.tgz``
are archives, any other ``.gz`` is a gzip file, anything else a plain file. An archive's members are not
opened as archives in turn: a member is a gzip file if its name ends in ``.gz`` and a plain one otherwise
(:func:`member_kind`). Names are compared case-insensitively (``SCANS.ZIP`` is a zip archive). The checksum
manifest (pipeline/download.py) says what is expected of each kind.

The download stage verifies files it has not yet trusted with the streaming readers (:func:`gunzip_chunks`,
:func:`gunzip_digest`, :func:`stream_digest`, :func:`walk_archive`): they hold at most a chunk or two in
memory whatever the file claims to hold, and stop at the first byte past a limit, so a decompression bomb
costs one chunk of memory and the time to inflate the limit. The whole-content readers (:func:`gunzip`,
:func:`read_tar_members`, :class:`RawTree`) are for files the download stage has already verified, whose
sizes the checksum manifest bounds.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
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
KIND_NAMES = {
    PLAIN: "a plain file",
    GZIP: "a gzip file",
    TAR: "a tar archive",
    TAR_GZ: "a compressed tar archive",
    ZIP: "a zip archive",
}
_SUFFIXES = ((".tar.gz", TAR_GZ), (".tgz", TAR_GZ), (".tar", TAR), (".zip", ZIP), (".gz", GZIP))  # longest first

Visit = Callable[[str, int, BinaryIO], None]  # (member name, size its header declares, unread body)

# What the standard decoders raise on bytes they cannot make sense of: their own errors, and what their parsing
# meets on hostile input (int() of a malformed PAX record, a zip version they do not implement, an index past a
# short field, a name that is not UTF-8, an offset too large for a seek). Whichever it is, the file is at fault.
DECODER_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    ValueError,
    LookupError,
    ArithmeticError,
    NotImplementedError,
)


class ArchiveError(StageError):
    """A file or archive is corrupt, truncated, too large or has a member it must not have."""


def file_kind(name: str) -> str:
    """The kind of the file called ``name`` (a path or a base name): one of ``PLAIN``, ``GZIP`` and ``ARCHIVES``."""
    lower = name.lower()
    return next((kind for suffix, kind in _SUFFIXES if lower.endswith(suffix)), PLAIN)


def member_kind(name: str) -> str:
    """The kind of an archive's member ``name``: ``GZIP`` or ``PLAIN`` (a member archive is not opened)."""
    return GZIP if name.lower().endswith(".gz") else PLAIN


def content_name(name: str, kind: str) -> str:
    """The name of what a file or member holds: a gzip file's without its ``.gz``, any other as it is."""
    return name[: -len(".gz")] if kind == GZIP else name


# ------------------------------------------------------------------------------------------ streams


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__


def gunzip(data: bytes, name: str) -> bytes:
    """Decompress a whole gzip stream; a corrupt or truncated one is an error naming ``name``."""
    try:
        return gzip.decompress(data)
    except (OSError, *DECODER_ERRORS) as e:
        raise ArchiveError(f"{name}: not a valid gzip file ({_reason(e)})") from None


def gunzip_chunks(stream: BinaryIO, name: str, limit: int | None = None) -> Iterator[bytes]:
    """The decompressed content of the gzip stream ``stream``, up to :data:`CHUNK_SIZE` bytes at a time.

    Raises ArchiveError as soon as more than ``limit`` bytes have come out, or when the stream is corrupt or
    truncated. ``gzip.GzipFile.read(n)`` inflates at most ``n`` bytes per call (zlib's ``max_length``), so
    memory stays at one chunk even for a stream that inflates a thousandfold. Concatenated gzip members and
    zero padding after the last one are read as ``gzip.decompress`` reads them.
    """
    total = 0
    try:
        with gzip.GzipFile(fileobj=stream, mode="rb") as content:
            while chunk := content.read(CHUNK_SIZE):
                total += len(chunk)
                if limit is not None and total > limit:
                    raise ArchiveError(f"{name}: decompresses to more than {limit:,} bytes (stopped there)")
                yield chunk
    except (OSError, *DECODER_ERRORS) as e:
        raise ArchiveError(f"{name}: not a valid gzip file ({_reason(e)})") from None


def _digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _chunks(stream: BinaryIO, name: str, limit: int | None) -> Iterator[bytes]:
    total = 0
    while chunk := stream.read(CHUNK_SIZE):
        total += len(chunk)
        if limit is not None and total > limit:
            raise ArchiveError(f"{name}: more than {limit:,} bytes (stopped there)")
        yield chunk


def gunzip_digest(stream: BinaryIO, name: str, limit: int | None = None) -> tuple[str, int]:
    """``(sha256, size)`` of the decompressed content of ``stream``, read as :func:`gunzip_chunks` reads it."""
    return _digest(gunzip_chunks(stream, name, limit))


def stream_digest(stream: BinaryIO, name: str, limit: int | None = None) -> tuple[str, int]:
    """``(sha256, size)`` of the bytes of ``stream``, read a chunk at a time; an error naming ``name`` as soon as
    more than ``limit`` bytes have come."""
    return _digest(_chunks(stream, name, limit))


def file_digest(path: Path) -> tuple[str, int]:
    """``(sha256, size)`` of the bytes of the file at ``path``, read a chunk at a time."""
    with open(path, "rb") as f:
        return stream_digest(f, path.name)


class _ChunkStream(io.RawIOBase):
    """A readable file over an iterator of chunks: what tarfile's stream mode reads a ``.tar.gz`` through, so that
    the tar is inflated by :func:`gunzip_chunks`, a chunk at a time and within its limit."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._chunk, self._offset = chunks, memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._offset == len(self._chunk):
            self._chunk, self._offset = memoryview(next(self._chunks, b"")), 0
        n = min(len(buffer), len(self._chunk) - self._offset)
        buffer[:n] = self._chunk[self._offset : self._offset + n]
        self._offset += n
        return n

    def drain(self) -> None:
        """Read the rest: the end of the gzip stream, where its checksum is, within the same limit."""
        for _ in self._chunks:
            pass


# ------------------------------------------------------------------------------------------ archives


def check_member_name(archive: str, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ".." in path.parts or "\\" in name or not path.parts:
        raise ArchiveError(f"{archive}: refusing member {name!r}: absolute or escaping path")


def _is_top_folder(name: str) -> bool:
    """Whether ``name`` is the archive's own top folder, ``./`` (as ``tar -C dir .`` writes): skipped, not refused."""
    return name != "" and not PurePosixPath(name).parts


class _Names:
    """The member names an archive has shown so far: a second member of the same name is refused."""

    def __init__(self, archive: str):
        self.archive, self.seen = archive, set()

    def add(self, name: str) -> str:
        name = str(PurePosixPath(name))  # "./a.gz" and "a.gz" are the same member
        if name in self.seen:
            raise ArchiveError(f"{self.archive}: member {name!r} appears twice")
        self.seen.add(name)
        return name


def walk_tar(
    path: str | Path, visit: Visit, *, label: str | None = None, compressed: bool = False, limit: int | None = None
) -> None:
    """Call ``visit(name, size, body)`` for each regular member of the tar at ``path``, in order.

    Before ``visit`` sees a member, its header has been checked: absolute names, ``..``, links, devices, sparse
    files (whose header may claim gigabytes that the archive does not hold) and a second member of the same
    name are refused. ``visit`` gets the header's size and an unread stream of the body, so that it can refuse
    a member by its name or size before reading a byte of it. A leading ``./`` is dropped, so
    ``./im0001.ppm.gz`` and ``im0001.ppm.gz`` are the same member; directories are skipped. Errors name the
    archive as ``label`` (its file name by default).

    A plain tar is read as it is (mode ``r:``). A ``compressed`` one (``.tar.gz``) is read in tarfile's stream
    mode through :func:`gunzip_chunks`, so that no more than ``limit`` bytes of tar are ever inflated; the rest
    of the gzip stream after the tar's end is read too, within the limit, to check the gzip checksum.
    """
    path = Path(path)
    label = label or path.name
    try:
        with contextlib.ExitStack() as stack:
            if compressed:
                content = _ChunkStream(gunzip_chunks(stack.enter_context(open(path, "rb")), label, limit))
                tar = stack.enter_context(tarfile.open(fileobj=content, mode="r|"))
            else:
                tar = stack.enter_context(tarfile.open(path, mode="r:"))
            names = _Names(label)
            for info in tar:
                if info.isdir() and _is_top_folder(info.name):
                    continue
                check_member_name(label, info.name)
                if info.isdir():
                    continue
                if info.issparse():
                    raise ArchiveError(f"{label}: refusing member {info.name!r}: a sparse file")
                if not info.isfile():
                    raise ArchiveError(f"{label}: refusing member {info.name!r}: not a regular file (link or device)")
                visit(names.add(info.name), info.size, tar.extractfile(info))
            if compressed:
                content.drain()
    except OSError as e:
        raise ArchiveError(f"{label}: cannot be read ({e})") from None
    except DECODER_ERRORS as e:
        raise ArchiveError(f"{label}: not a valid tar archive ({_reason(e)})") from None


# The end of central directory record: signature, this disk, the directory's first disk, entries on this disk,
# entries, the directory's size and offset, the comment's length. Zip64 archives add a locator just before it,
# pointing at the zip64 end record (signature, record size, two versions, two disk numbers, two entry counts,
# the directory's size and offset).
_END = struct.Struct("<4s4H2LH")
_END_SIGNATURE, _END_ROOM = b"PK\x05\x06", _END.size + (1 << 16)  # the record and room for its comment
_ZIP64_LOCATOR, _ZIP64_LOCATOR_SIGNATURE = struct.Struct("<4sLQL"), b"PK\x06\x07"
_ZIP64_END, _ZIP64_END_SIGNATURE = struct.Struct("<4sQ2H2L4Q"), b"PK\x06\x06"


def zip_directory_size(path: str | Path, label: str | None = None) -> int:
    """The size in bytes of the zip archive's central directory, as its end record states it.

    zipfile reads the whole central directory into memory and makes an object of each of its entries before
    anyone can look at one, so the download stage compares this size with what the manifest's members can
    take first. It is found as zipfile finds it (``_EndRecData``): the end record is the last 22 bytes, or else
    the last one in the final 64 KiB (its comment may follow it); a zip64 locator right before it means that
    the zip64 end record right before that holds the figures.
    """
    path = Path(path)
    label = label or path.name
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - _END_ROOM)
            f.seek(start)
            tail = f.read()
            at = len(tail) - _END.size
            if at < 0 or tail[at : at + 4] != _END_SIGNATURE or tail[-2:] != b"\0\0":
                at = tail.rfind(_END_SIGNATURE)
            if at < 0 or len(tail) - at < _END.size:
                raise ArchiveError(f"{label}: not a valid zip archive (no end of central directory record)")
            directory_size = _END.unpack_from(tail, at)[5]
            locator_at = start + at - _ZIP64_LOCATOR.size
            if locator_at < _ZIP64_END.size:
                return directory_size
            f.seek(locator_at - _ZIP64_END.size)
            record = f.read(_ZIP64_END.size + _ZIP64_LOCATOR.size)
            if record[_ZIP64_END.size : _ZIP64_END.size + 4] != _ZIP64_LOCATOR_SIGNATURE:
                return directory_size
            return _ZIP64_END.unpack_from(record)[8] if record[:4] == _ZIP64_END_SIGNATURE else directory_size
    except OSError as e:
        raise ArchiveError(f"{label}: cannot be read ({e.strerror or e})") from None


def _zip_member_is_file(info: zipfile.ZipInfo, label: str) -> bool:
    """Whether ``info`` is a regular member to visit (False: a folder, skipped); refuses every other kind."""
    name = info.filename
    file_type = stat.S_IFMT(info.external_attr >> 16)  # the Unix mode, where the archiver recorded one
    if file_type == stat.S_IFLNK:
        raise ArchiveError(f"{label}: refusing member {name!r}: a symbolic link")
    if info.is_dir() or file_type == stat.S_IFDIR:
        if not _is_top_folder(name):
            check_member_name(label, name)
        return False
    check_member_name(label, name)
    if file_type not in (0, stat.S_IFREG):
        raise ArchiveError(f"{label}: refusing member {name!r}: not a regular file (link or device)")
    if info.flag_bits & 0x41:  # bit 0: encrypted; bit 6: strong encryption
        raise ArchiveError(f"{label}: refusing member {name!r}: encrypted")
    # zipfile inflates bzip2 and LZMA data without a cap on what one read produces, so one read of a bomb could
    # take gigabytes; deflate (nearly every zip) is inflated at most a chunk at a time.
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArchiveError(
            f"{label}: refusing member {name!r}: compression method {info.compress_type} "
            "(only stored and deflated members are read)"
        )
    return True


def walk_zip(path: str | Path, visit: Visit, *, label: str | None = None) -> None:
    """Call ``visit(name, size, body)`` for each regular member of the zip archive at ``path``, in the order of
    its central directory, with the checks of :func:`walk_tar`: names, symbolic links (a Unix mode of
    ``S_IFLNK`` in ``external_attr``) and other special files, encrypted members, compression methods other
    than stored and deflate, and a name twice are refused before ``visit`` sees the member. ``size`` is what
    the directory declares the content to be; zipfile stops reading there, so no body gives more than it
    declares (and a body whose content differs fails its CRC-32)."""
    path = Path(path)
    label = label or path.name
    try:
        with zipfile.ZipFile(path) as archive:
            names = _Names(label)
            for info in archive.infolist():
                if _zip_member_is_file(info, label):
                    name = names.add(info.filename)
                    with archive.open(info) as body:
                        visit(name, info.file_size, body)
    except OSError as e:
        raise ArchiveError(f"{label}: cannot be read ({e})") from None
    except DECODER_ERRORS as e:
        raise ArchiveError(f"{label}: not a valid zip archive ({_reason(e)})") from None


def walk_archive(
    path: str | Path, kind: str, visit: Visit, *, label: str | None = None, limit: int | None = None
) -> None:
    """:func:`walk_zip` or :func:`walk_tar` for an archive of ``kind``; ``limit`` bounds a compressed tar's tar."""
    if kind == ZIP:
        walk_zip(path, visit, label=label)
    elif kind in (TAR, TAR_GZ):
        walk_tar(path, visit, label=label, compressed=kind == TAR_GZ, limit=limit)
    else:
        raise ValueError(f"not an archive kind: {kind!r}")  # a bug in the caller


def read_tar_members(path: str | Path) -> dict[str, bytes]:
    """All members of a tar archive as ``{name: bytes}``, with the checks of :func:`walk_tar`."""
    path = Path(path)
    members: dict[str, bytes] = {}

    def keep(name: str, size: int, body: BinaryIO) -> None:
        members[name] = _read_body(body, size, f"{path.name}: member {name!r}")

    walk_tar(path, keep)
    return members


def _read_body(body: BinaryIO, size: int, where: str) -> bytes:
    data = body.read()
    if len(data) != size:
        raise ArchiveError(f"{where} is truncated")
    return data


# ------------------------------------------------------------------------------------------ folders


def list_files(directory: str | Path) -> list[str]:
    """The files under ``directory``, at any depth, as sorted POSIX paths relative to it (``images/0001.png``).

    A symbolic link to a file counts as the file (DVC may link its cache into the workspace); a link to a
    folder is not followed, so that a link to a parent cannot make the walk endless.
    """
    directory = Path(directory)

    def fail(error: OSError) -> None:
        raise StageError(f"{error.filename}: cannot be read ({error.strerror or error})")

    names = []
    for root, _, files in os.walk(directory, onerror=fail):
        folder = Path(root)
        names += [(folder / f).relative_to(directory).as_posix() for f in files if (folder / f).is_file()]
    return sorted(names)


class RawTree:
    """The files of a downloaded dataset directory (data/raw/<name>/), with archives opened as folders.

    ``names`` lists what the directory holds, as sorted POSIX names relative to it:

    - a plain file as it is: ``images/0001.png``;
    - a gzip file (``.gz``, not ``.tar.gz`` / ``.tgz``) by its decompressed content: ``x/im.ppm.gz`` is
      ``x/im.ppm``;
    - each regular member of an archive (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``) under the archive's name,
      a gzip member by its decompressed content: ``x.zip/masks/0001.png``,
      ``stare-images.tar/im0001.ppm`` (from the member ``im0001.ppm.gz``). Folders are not listed, and a
      member archive is not opened.

    Two files or members that would have the same name are an error naming both. :meth:`read` returns the
    content of the names asked for, opening each archive once, with the member checks of :func:`walk_tar` and
    :func:`walk_zip`. These files were verified by the download stage, so contents are read whole.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._sources: dict[str, tuple[str, str | None]] = {}  # name: (file, member or None for the file itself)
        for file in list_files(self.directory):
            kind = file_kind(file)
            if kind in ARCHIVES:
                self._list_archive(file, kind)
            else:
                self._add(content_name(file, kind), file, None)
        self.names: list[str] = sorted(self._sources)

    def _describe(self, file: str, member: str | None) -> str:
        return file if member is None else f"{file}: member {member}"

    def _add(self, name: str, file: str, member: str | None) -> None:
        if name in self._sources:
            raise ArchiveError(
                f"{self.directory}: {name!r} is both {self._describe(*self._sources[name])} and "
                f"{self._describe(file, member)}"
            )
        self._sources[name] = (file, member)

    def _list_archive(self, file: str, kind: str) -> None:
        def add(member: str, size: int, body: BinaryIO) -> None:
            self._add(f"{file}/{content_name(member, member_kind(member))}", file, member)

        walk_archive(self.directory / file, kind, add, label=str(self.directory / file))

    def read(self, names: Iterable[str]) -> dict[str, bytes]:
        """``{name: content}`` for each of ``names``, in their order; an unknown name is an error naming it."""
        names = list(names)
        wanted: dict[str, dict[str | None, str]] = {}  # file: {member (None: the file itself): name}
        for name in names:
            if name not in self._sources:
                raise ArchiveError(f"{self.directory}: no file or archive member makes {name!r}")
            file, member = self._sources[name]
            wanted.setdefault(file, {})[member] = name
        contents: dict[str, bytes] = {}
        for file, members in wanted.items():
            contents.update(self._read_file(file, members))
        return {name: contents[name] for name in names}

    def _read_file(self, file: str, members: dict[str | None, str]) -> dict[str, bytes]:
        path, kind = self.directory / file, file_kind(file)
        label = str(path)
        if kind not in ARCHIVES:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ArchiveError(f"{label}: cannot be read ({e.strerror or e})") from None
            return {members[None]: gunzip(data, label) if kind == GZIP else data}
        found: dict[str, bytes] = {}

        def keep(member: str, size: int, body: BinaryIO) -> None:
            if member in members:
                where = f"{label}: member {member}"
                data = _read_body(body, size, where)
                found[members[member]] = gunzip(data, where) if member_kind(member) == GZIP else data

        walk_archive(path, kind, keep, label=label)
        if missing := sorted(set(members.values()) - set(found)):
            raise ArchiveError(f"{label}: members missing from the archive: {missing}")
        return found

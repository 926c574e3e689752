"""Small data the tests make: MNIST-shaped IDX files and STARE-shaped archives, and their checksum manifests."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from pipeline import manifest
from pipeline.datasets import mnist, stare

# ------------------------------------------------------------------------------------------ STARE

H, W = 40, 48
IDS = stare.STANDARD_TRAIN + stare.STANDARD_TEST
CENTRE, RADIUS, TOP, BOTTOM = (20.0, 24.0), 19.0, 3, 36  # (y, x) centre; the frame clips rows < 3 and > 36


def true_disc() -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    return ((y - CENTRE[0]) ** 2 + (x - CENTRE[1]) ** 2 <= RADIUS**2) & (y >= TOP) & (y <= BOTTOM)


def synthetic_image(seed: int, vessels: np.ndarray) -> np.ndarray:
    """A noisy orange disc on a dark green frame, with darker vessels."""
    rng = np.random.default_rng(seed)
    image = np.zeros((H, W, 3), dtype=np.float64)
    image[...] = (14, 25, 14)  # the frame: dark green, as in STARE
    image[true_disc()] = (170, 90, 20)
    image[vessels.astype(bool)] = (90, 40, 10)
    image[: TOP - 1] = image[BOTTOM + 2 :] = 0  # the black bars above and below
    return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


def vessel_lines(seed: int, extra: bool) -> np.ndarray:
    """0 / 255 vessels: a horizontal and a vertical line through the disc; ``extra`` (the other observer) adds one."""
    mask = np.zeros((H, W), dtype=np.uint8)
    row, col = 12 + seed % 10, 14 + seed % 15
    mask[row, 10:38] = mask[8:33, col] = 255
    if extra:
        mask[26, 12:36] = 255
    return mask & (true_disc() * 255).astype(np.uint8)


def pnm(array: np.ndarray) -> bytes:
    magic = b"P6" if array.ndim == 3 else b"P5"
    # XV wrote a comment into the label headers: the parser must accept one.
    return magic + b"\n# CREATOR: XV\n" + f"{array.shape[1]} {array.shape[0]}\n255\n".encode() + array.tobytes()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build_raw(directory: Path, *, images: dict | None = None, ah: dict | None = None, vk: dict | None = None) -> Path:
    """Write the three archives; ``images`` / ``ah`` / ``vk`` override or (value None) drop members."""
    members = {"images": {}, "ah": {}, "vk": {}}
    for n, image_id in enumerate(IDS):
        members["images"][f"{image_id}.ppm.gz"] = gzip.compress(pnm(synthetic_image(n, vessel_lines(n, False))))
        members["ah"][f"{image_id}.ah.ppm.gz"] = gzip.compress(pnm(vessel_lines(n, extra=False)))
        members["vk"][f"{image_id}.vk.ppm.gz"] = gzip.compress(pnm(vessel_lines(n, extra=True)))
    for key, overrides in (("images", images), ("ah", ah), ("vk", vk)):
        for name, data in (overrides or {}).items():
            if data is None:
                del members[key][name]
            else:
                members[key][name] = data
    directory.mkdir(parents=True, exist_ok=True)
    write_tar(directory / "stare-images.tar", members["images"])
    write_tar(directory / "labels-ah.tar", members["ah"])
    write_tar(directory / "labels-vk.tar", members["vk"])
    return directory


# ------------------------------------------------------------------------------------------ MNIST


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An uncompressed IDX file: big-endian magic, one uint32 per dimension, then the uint8 payload."""
    return np.array([magic, *array.shape], dtype=">u4").tobytes() + array.astype(np.uint8).tobytes()


def build_mnist(directory: Path, n_train: int = 200, n_test: int = 60, seed: int = 0) -> Path:
    """The four MNIST files, tiny: a bright bar whose height on the image depends on the digit, on noise."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            top = 4 + 2 * label
            images[i, top : top + 6, 8:20] = 200
        images_file, labels_file = mnist.FILES[split]
        (directory / images_file).write_bytes(gzip.compress(idx_bytes(images, mnist.IMAGES_MAGIC), mtime=0))
        (directory / labels_file).write_bytes(gzip.compress(idx_bytes(labels, mnist.LABELS_MAGIC), mtime=0))
    return directory


# ------------------------------------------------------------------------------------------ manifests


def manifest_for(directory: Path) -> dict:
    """A download manifest (pipeline/checksums/<dataset>.json) describing the files in ``directory``."""
    return manifest.manifest_for([directory])


# ------------------------------------------------------------------------------------------ hostile files


def write_gzip_bomb(path: Path, inflated: int, chunk: int = 1 << 20) -> Path:
    """A gzip file of ``inflated`` zero bytes (about 1/1000 of that on disk), compressed a chunk at a time."""
    zeros = bytes(chunk)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as out:
        for start in range(0, inflated, chunk):
            out.write(zeros[: min(chunk, inflated - start)])
    return path


def sparse_tar(name: str, claimed: int) -> bytes:
    """A tar archive of 2 KiB holding one sparse member ``name`` that claims ``claimed`` bytes: one block of
    data, the rest holes, which tarfile's reader hands out as zeros."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, tarfile.BLOCKSIZE  # the size stored in the archive
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    # The old GNU sparse header (read by tarfile's _proc_sparse): a map of (offset, length) pairs from byte
    # 386, and the member's real size at 483.
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(tarfile.BLOCKSIZE, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(claimed, 12, tarfile.GNU_FORMAT)
    header[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(header))[0]
    return bytes(header) + b"x" * tarfile.BLOCKSIZE + bytes(2 * tarfile.BLOCKSIZE)


# ------------------------------------------------------------------------------------------ zip archives


def zip_bytes(
    members: dict[str, bytes],
    *,
    folders: tuple[str, ...] = (),
    symlinks: dict[str, str] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    """A zip archive of ``folders`` (``inner/``), ``members`` (names kept as given, ``../x`` included) and
    ``symlinks`` (name: target), in that order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for folder in folders:
            archive.writestr(zipfile.ZipInfo(folder), b"")
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # as Info-ZIP's zip -y
            archive.writestr(info, target)
    return buffer.getvalue()


def zip_with_duplicate(name: str, first: bytes, second: bytes) -> bytes:
    """A zip archive holding two members called ``name``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate name, as it should
        archive.writestr(name, first)
        archive.writestr(name, second)
    return buffer.getvalue()


def _zip_headers(data: bytes, member: str) -> tuple[int, int]:
    """The offsets of ``member``'s local header and central-directory entry in the zip archive ``data``."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos, offset = archive.infolist(), archive.start_dir
    for info in infos:
        if info.filename == member:
            return info.header_offset, offset
        offset += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
    raise KeyError(member)


def zip_patched(data: bytes, member: str, *, flag_bits: int = 0, file_size: int | None = None) -> bytes:
    """``data`` with ``member``'s headers changed as a hostile archiver might write them: general-purpose flag
    bits set (1: encrypted), or another uncompressed size declared (in both headers; zipfile reads the central
    directory's)."""
    local, central = _zip_headers(data, member)
    patched = bytearray(data)
    for flags_at in (local + 6, central + 8):
        patched[flags_at : flags_at + 2] = struct.pack("<H", struct.unpack_from("<H", patched, flags_at)[0] | flag_bits)
    if file_size is not None:
        struct.pack_into("<L", patched, local + 22, file_size)
        struct.pack_into("<L", patched, central + 24, file_size)
    return bytes(patched)


def write_zip_bomb(path: Path, member: str, inflated: int, chunk: int = 1 << 20) -> Path:
    """A zip archive holding one member ``member`` of ``inflated`` zero bytes (about 1/1000 of that on disk),
    deflated a chunk at a time."""
    zeros = bytes(chunk)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open(member, "w", force_zip64=inflated > zipfile.ZIP64_LIMIT) as out:
            for start in range(0, inflated, chunk):
                out.write(zeros[: min(chunk, inflated - start)])
    return path


def write_tar_gz_bomb(path: Path, tar: bytes, zeros: int, chunk: int = 1 << 20) -> Path:
    """A gzip file of the tar archive ``tar`` followed by ``zeros`` zero bytes: tarfile stops at the tar's end,
    the gzip stream goes on for as long as ``zeros`` says."""
    block = bytes(chunk)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as out:
        out.write(tar)
        for start in range(0, zeros, chunk):
            out.write(block[: min(chunk, zeros - start)])
    return path


# ------------------------------------------------------------------------------------------ processes


def finished_pid() -> int:
    """The pid of a process that has ended, as in the temporaries' names that a killed stage leaves behind."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid

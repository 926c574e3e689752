"""Reading image files safely (Pillow; tifffile for multi-channel 16-bit TIFF), for prepare and predict.

Every file and image is held to MAX_FILE_BYTES, MAX_PIXELS and MAX_IMAGE_BYTES by what its header declares
before anything is decoded; a file that breaks a rule is one :class:`ImageError` line. See docs/datasets.md.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from pipeline.stage import StageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm", ".pnm")
# Pillow's decompression-bomb limit, and the bytes of 16-bit RGBA that size: a tiny TIFF can declare 40000 x 40000.
MAX_PIXELS = 1024**3 // 4 // 3
MAX_IMAGE_BYTES = 8 * MAX_PIXELS
MAX_FILE_BYTES = 1 << 30  # more than any image within those limits takes uncompressed


class ImageError(StageError):
    """An image or mask file cannot be read, or holds pixels its parameters do not allow."""


Image.MAX_IMAGE_PIXELS = None  # check_size takes the place of Pillow's own bomb check, on every header read


def check_size(name: str, width: int, height: int, channels: int, itemsize: int, what: str = "") -> None:
    """Refuse what an image's header declares if it exceeds MAX_PIXELS or MAX_IMAGE_BYTES."""
    if width * height > MAX_PIXELS or width * height * channels * itemsize > MAX_IMAGE_BYTES:
        raise ImageError(
            f"{name}: {what}{width} x {height} pixels x {channels} channel{'s' * (channels != 1)} of "
            f"{itemsize} byte{'s' * (itemsize != 1)}, more than an image may have ({MAX_PIXELS:,} pixels, "
            f"{MAX_IMAGE_BYTES:,} bytes)"
        )


def open_file(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file of at most MAX_FILE_BYTES (O_NONBLOCK: a pipe would wait
    for a writer); OSError if it cannot be opened."""
    file = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        file.close()
        raise ImageError(f"{path}: not a regular file (a device, a pipe or a socket)")
    if info.st_size > MAX_FILE_BYTES:
        file.close()
        raise ImageError(f"{path}: {info.st_size:,} bytes, more than an image file may have ({MAX_FILE_BYTES:,})")
    return file


def _tiff_pixels(tif: tifffile.TiffFile, name: str) -> np.ndarray:
    """The first page of a TIFF, its declared size and its segments' (tiles') checked before it is decoded."""
    if not len(tif.pages):  # a header whose first page offset points nowhere
        raise tifffile.TiffFileError("no image in the file")
    page = tif.pages[0]
    if page.dtype is None:
        raise tifffile.TiffFileError(f"sample format {page.sampleformat} of {page.bitspersample} bits not supported")
    check_size(name, page.imagewidth, page.imagelength * page.imagedepth, page.samplesperpixel, page.dtype.itemsize)
    if page.is_tiled:  # a tile is decoded whole, and may be declared larger than the image
        check_size(
            name,
            page.tilewidth,
            page.tilelength * page.tiledepth,
            page.samplesperpixel if page.planarconfig == 1 else 1,
            page.dtype.itemsize,
            "one tile of ",
        )
    return page.asarray(maxworkers=1)  # one decoded segment in memory at a time


def _wide_samples(image: Image.Image, name: str) -> bool:
    """Whether a TIFF holds several channels of more than 8 bits, which Pillow cuts to their high byte (tifffile
    reads those); a declared tile is checked first."""
    tags = image.tag_v2
    if 322 in tags and 323 in tags:  # TileWidth, TileLength: a tile is decoded whole, and may exceed the image
        check_size(name, int(tags[322]), int(tags[323]), len(image.getbands()), 1, "one tile of ")
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8 and len(bits) > 1


def decode(source: bytes | BinaryIO | Path, name: str) -> tuple[np.ndarray, list[int] | None]:
    """The pixels of an image file's first frame as stored, (H, W[, C]) uint8 or uint16, and a palette image's
    palette (flat RGB); ``source`` is the content, an open file or a path."""
    if isinstance(source, Path):
        try:
            file = open_file(source)
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
        with file:
            return decode(file, name)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:  # reads the header only
            image.seek(0)
            if image.format == "TIFF" and _wide_samples(image, name):
                stream.seek(0)
                with tifffile.TiffFile(stream, name=name) as tif:
                    return _tiff_pixels(tif, name), None
            itemsize = 4 if image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
            check_size(name, *image.size, len(image.getbands()), itemsize)
            if image.mode == "P":
                return np.asarray(image), image.getpalette("RGB")
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(image).astype(np.uint16), None
            if image.mode in ("1", "L", "LA", "RGB", "RGBA"):
                return np.asarray(image.convert("L") if image.mode == "1" else image), None
            return np.asarray(image.convert("RGB")), None  # CMYK, YCbCr, LAB, I, F: as RGB
    except UnidentifiedImageError:  # its message names an in-memory buffer, no use to anyone
        raise ImageError(f"{name}: not a readable image (no image format that Pillow knows)") from None
    except (OSError, ValueError, SyntaxError, zlib.error, lzma.LZMAError, tifffile.TiffFileError) as e:
        raise ImageError(f"{name}: not a readable image ({' '.join(str(e).split())[:200]})") from None


# tifffile's zlib, LZMA and PackBits codecs ignore the segment size it passes them (``out``) and inflate all the
# data holds (a 1 MB strip of a 16 x 16 image made 2 GB): these stop there, as tifffile truncates the result.


def _inflate(data: bytes, out=None) -> bytes:
    return zlib.decompressobj().decompress(data, out if isinstance(out, int) else 0)  # 0: no limit


def _unxz(data: bytes, out=None) -> bytes:
    limit = out if isinstance(out, int) else -1  # -1: no limit
    result = bytearray()
    while data and len(result) != limit:  # concatenated streams, as lzma.decompress reads them
        decompressor = lzma.LZMADecompressor()
        result += decompressor.decompress(data, limit - len(result) if limit >= 0 else -1)
        data = decompressor.unused_data if decompressor.eof else b""
    return bytes(result)


def _unpackbits(data: bytes, out=None) -> bytes:
    limit = out if isinstance(out, int) else 128 * len(data)
    result, i = bytearray(), 0
    while i < len(data) and len(result) < limit:
        code = data[i]
        if code < 128:  # the next code + 1 bytes as they are
            result += data[i + 1 : i + code + 2]
            i += code + 2
        elif code > 128:  # the next byte, 257 - code times
            result += data[i + 1 : i + 2] * (257 - code)
            i += 2
        else:  # no operation
            i += 1
    return bytes(result[:limit])


class _BoundedDecompressors(Mapping):
    """tifffile's decompressors, with those above in place of its own for their compressions."""

    BOUNDED = {8: _inflate, 32946: _inflate, 50013: _inflate, 34925: _unxz, 32773: _unpackbits}

    def __init__(self, codecs: Mapping):
        self.codecs = codecs

    def __getitem__(self, key: int):
        return self.BOUNDED.get(key) or self.codecs[key]

    def __iter__(self):
        return iter(self.codecs)

    def __len__(self) -> int:
        return len(self.codecs)


if not isinstance(tifffile.TIFF.DECOMPRESSORS, _BoundedDecompressors):
    tifffile.TIFF.DECOMPRESSORS = _BoundedDecompressors(tifffile.TIFF.DECOMPRESSORS)


def to_uint8(pixels: np.ndarray, name: str) -> np.ndarray:
    """8-bit pixels; 16-bit ones mapped over their full range (65535 -> 255)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.round(pixels / 257).astype(np.uint8)
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    raise ImageError(f"{name}: {pixels.dtype} pixels; images must be 8- or 16-bit integers")


def look_up(indices: np.ndarray, palette: list[int]) -> np.ndarray:
    """The RGB colours of a palette image's indices (a short palette padded with black)."""
    return np.asarray(palette + [0] * (768 - len(palette)), dtype=np.uint8).reshape(256, 3)[indices]


def as_image(pixels: np.ndarray, palette: list[int] | None, channels: int, name: str) -> np.ndarray:
    """uint8 (H, W, channels) from what :func:`decode` returns: palette looked up, alpha dropped, gray repeated or
    RGB reduced to luma (ITU-R 601, as Pillow)."""
    if palette is not None:
        pixels = look_up(pixels, palette)
    pixels = to_uint8(pixels, name)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: pixels of shape {pixels.shape}; expected gray, gray+alpha, RGB or RGBA")
    if pixels.shape[2] in (2, 4):  # alpha dropped: a mask, not transparency, says what to score
        pixels = pixels[..., :-1]
    if pixels.shape[2] == channels:
        return np.ascontiguousarray(pixels)
    if channels == 3:
        return np.repeat(pixels, 3, axis=2)
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.round(luma).clip(0, 255).astype(np.uint8)[..., None]


def read_image(source: bytes | BinaryIO | Path, name: str, channels: int = 3) -> np.ndarray:
    """An image file (see :func:`decode`) as uint8 (H, W, channels): the way prepare and predict read every image."""
    pixels, palette = decode(source, name)
    return as_image(pixels, palette, channels, name)


def resize(array: np.ndarray, scale: float, nearest: bool) -> np.ndarray:
    """``array`` (H, W[, C]) resized by ``scale``: anti-aliased for images, nearest neighbour for labels."""
    if scale == 1:
        return array
    from skimage.transform import rescale  # here: importing scikit-image takes prepare's workers half a second

    out = rescale(
        array,
        scale,
        order=0 if nearest else 1,
        preserve_range=True,
        anti_aliasing=not nearest and scale < 1,
        channel_axis=2 if array.ndim == 3 else None,
    )
    return (out if nearest else np.round(out)).astype(array.dtype)


def decode_valid(source: bytes | BinaryIO | Path, name: str) -> np.ndarray:
    """bool (H, W): the pixels a validity mask marks as scored (any nonzero colour)."""
    pixels, palette = decode(source, name)
    return as_image(pixels, palette, 3, name).any(axis=2)

"""The checksum manifest (``pipeline/checksums/<dataset>.json``): the files a dataset is made of, each with the
sha256 and length of every accepted copy, and what unpacking it may produce (``size``). Read by the download
stage, written by ``python -m pipeline.manifest``. Format and threat model: docs/download.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from pipeline import archives
from pipeline.fetch import DownloadError

CHECKSUMS_DIR = Path(__file__).parent / "checksums"
SHA256 = re.compile(r"[0-9a-f]{64}")


def _keys(value: object, where: str, keys: set[str] | None = None, what: str = "") -> dict:
    """``value``, a non-empty mapping with exactly ``keys`` (None: any); else a one-line error."""
    if not isinstance(value, dict) or not value:
        raise DownloadError(f"{where}: expected a non-empty mapping, got {value!r}")
    if keys is None:
        return value
    if unknown := sorted(set(value) - keys):
        raise DownloadError(f"{where}: unknown key {unknown[0]!r} for {what} (known: {', '.join(sorted(keys))})")
    if missing := sorted(keys - set(value)):
        raise DownloadError(f"{where}: missing {missing[0]!r}")
    return value


def _count(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DownloadError(f"{where}: expected a whole number of bytes >= 0, got {value!r}")


def check_files(files: object, where: str) -> dict[str, dict]:
    """Validate a manifest's ``files`` (``where`` names the manifest in errors); returns it."""
    files = _keys(files, f"{where}: files")
    for name, entry in files.items():
        if archives.escapes(name):
            raise DownloadError(f"{where}: files: {name!r} is not a relative path inside the dataset's directory")
        if (normal := str(PurePosixPath(name))) != name:
            raise DownloadError(f"{where}: files: {name!r} is not in normal form ({normal!r})")
        if folder := next((str(p) for p in PurePosixPath(name).parents if str(p) in files), None):
            raise DownloadError(f"{where}: files.{name}: {folder!r} is listed as a file, so it cannot be a folder")
        at, kind = f"{where}: files.{name}", archives.file_kind(name)
        keys = {"copies"} if kind == archives.PLAIN else {"copies", "size"}
        _keys(entry, at, keys, f"{archives.KIND_NAMES[kind]}, as its name says")
        for sha256, size in _keys(entry["copies"], f"{at}.copies").items():
            if not SHA256.fullmatch(sha256):
                raise DownloadError(f"{at}.copies: {sha256!r} is not a sha256 (64 lowercase hex digits)")
            _count(size, f"{at}.copies.{sha256}")
        if "size" in keys:
            _count(entry["size"], f"{at}.size")
    return files


def load_manifest(path: Path) -> dict[str, dict]:
    """Read and validate a checksum manifest; returns its ``files`` mapping."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise DownloadError(f"{path}: no checksum manifest for this dataset (manifests exist for: {known})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{path}: not a readable JSON manifest: {e}") from None
    return check_files(_keys(manifest, str(path), {"files"}, "a manifest")["files"], str(path))

"""Write a checksum manifest for the download stage: ``python -m pipeline.manifest <directory | file>...``.

Prints, as JSON, the manifest (format: pipeline/download.py) of the given files, or of every file in a given
directory: for a ``.tar`` archive, each member's decompressed sha256 and size (every member must be a gzip
file); for any other file, read as gzip, the same of its content. Save it as
``pipeline/checksums/<dataset>.json``. A whole-file ``sha256`` and ``bytes`` are not written: add them by
hand only for files that every source serves byte for byte (as the official STARE label archives).

Files are read a chunk at a time, so any size can be described in little memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import BinaryIO

from pipeline.archives import gunzip_digest, walk_tar
from pipeline.stage import StageError


def _gzip_entry(stream: BinaryIO, name: str) -> dict:
    digest, size = gunzip_digest(stream, name)
    return {"gunzip_sha256": digest, "size": size}


def describe(path: Path) -> dict:
    """The manifest entry of the gzip file or tar archive at ``path``."""
    if path.suffix == ".tar":
        members = {}

        def add(name: str, size: int, body: BinaryIO) -> None:
            members[name] = _gzip_entry(body, f"{path.name}: member {name}")

        walk_tar(path, add)
        return {"members": members}
    try:
        with open(path, "rb") as stream:
            return _gzip_entry(stream, path.name)
    except OSError as e:
        raise StageError(f"{path}: cannot be read ({e.strerror or e})") from None


def manifest_for(paths: list[Path]) -> dict:
    """The manifest of ``paths``: files, or directories standing for every file in them (sorted by name)."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise StageError(f"{path}: no such file or directory")
    names = [path.name for path in files]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise StageError(f"{duplicates[0]}: two files of that name (a manifest names files, not paths)")
    return {"files": {path.name: describe(path) for path in files}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.manifest", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="gzip files, tar archives, or directories of them")
    args = parser.parse_args(argv)
    try:
        manifest = manifest_for(args.paths)
    except StageError as e:
        print(f"manifest: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

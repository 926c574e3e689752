"""The ``download`` stage: ``python -m pipeline.download <dataset>`` fetches the files that
``pipeline/checksums/<dataset>.json`` lists into ``data/raw/<dataset>/``, stored as they were served.

Sources, in order: ``$SEGPIPE_MIRROR`` (``<mirror>/<dataset>/<file>``), then ``<dataset>.download.base_urls``.
A file is kept only if its whole-file sha256, taken as it is fetched, is one of the copies the manifest
accepts, and it then unpacks within the manifest's ``size`` (pipeline/archives.py). Any other copy is a bad
copy: one line of warning, and the next source. Every file verified, or nothing written. docs/download.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import archives, fetch
from pipeline.atomic import atomic_path
from pipeline.fetch import MIRROR_ENV, DownloadError, DownloadParams, redact
from pipeline.manifest_format import CHECKSUMS_DIR, load_manifest
from pipeline.params import load_params
from pipeline.stage import DatasetPaths, run

__all__ = ["CHECKSUMS_DIR", "DownloadError", "DownloadParams", "download", "download_stage", "redact"]


def fetch_accepted(url: str, target: Path, name: str, entry: dict, params: DownloadParams) -> None:
    """Fetch ``url`` into ``target`` if it is an accepted copy of ``name``: fetch.BadCopy or ArchiveError if not."""
    sha256, _ = fetch.fetch(url, target, max(entry["copies"].values()), params)
    if sha256 not in entry["copies"]:
        raise fetch.BadCopy(f"{name}: sha256 is {sha256}, expected {' or '.join(entry['copies'])}")
    if "size" in entry:  # only now, its bytes known to be an accepted copy's, is anything decompressed
        archives.unpacked_size(target, name, limit=entry["size"])


def _obtain(name: str, entry: dict, sources: list[str], params: DownloadParams, target: Path) -> tuple[str, list[str]]:
    """Write an accepted copy of ``name`` to ``target``; returns its URL, and a line for each bad copy before."""
    failures, bad_copies = [], []
    for url in (fetch.join(base, name) for base in sources):
        try:
            fetch_accepted(url, target, name, entry, params)
            return url, bad_copies
        except (fetch.BadCopy, archives.ArchiveError) as e:  # the source answered, with a file that is not this one
            bad_copies.append(f"{redact(url)} served a bad copy ({redact(str(e))})")
            failures.append(f"  {redact(url)}: {redact(str(e))}")
        except fetch.SourceError as e:
            failures.append(f"  {redact(url)}: {redact(str(e))}")
    tried = "\n".join(failures) if failures else f"  (no sources: set base_urls or ${MIRROR_ENV})"
    raise DownloadError(f"{name}: could not be obtained from any source:\n{tried}")


def download(dataset: str, params: DownloadParams, manifest_path: Path, out_dir: Path, mirror: str | None) -> None:
    """Fetch every file of ``manifest_path`` into ``out_dir``: all verified, or ``out_dir`` untouched."""
    files = load_manifest(manifest_path)
    sources = fetch.source_urls(dataset, params.base_urls, mirror)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, entry in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # names may have folders: images/0001.png
            url, bad_copies = _obtain(name, entry, sources, params, tmp / name)
            for bad_copy in bad_copies:
                print(
                    f"download {dataset}: warning: {name}: {bad_copy}; used the copy from {redact(url)}",
                    file=sys.stderr,
                )
            print(f"{name}: {(tmp / name).stat().st_size:,} bytes verified, from {redact(url)}", flush=True)


def download_stage(dataset: str) -> str:
    settings = load_params(dataset, "download", DownloadParams)
    out_dir = DatasetPaths(dataset).raw
    manifest = CHECKSUMS_DIR / f"{dataset}.json"
    download(dataset, settings, manifest, out_dir, os.environ.get(MIRROR_ENV) or None)
    return f"download {dataset}: every file verified -> {out_dir}"


if __name__ == "__main__":
    run(download_stage)

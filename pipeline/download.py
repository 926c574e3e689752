"""The ``download`` stage: ``python -m pipeline.download <dataset>`` fetches the files that
``pipeline/checksums/<dataset>.json`` lists into ``data/raw/<dataset>/``, stored as they were served, from
``$SEGPIPE_MIRROR/<dataset>`` then config.yaml's ``<dataset>.download.base_urls``. A copy is kept only if its
sha256 is an accepted one and it unpacks within the manifest's ``size``; all files verified, or nothing written.
docs/download.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import archives, fetch
from pipeline.atomic import atomic_path
from pipeline.fetch import CHECKSUMS_DIR, MIRROR_ENV, DownloadError, DownloadParams, load_manifest, redact
from pipeline.params import CONFIG_FILE, load_params
from pipeline.stage import DatasetPaths, run


def _obtain(name: str, entry: dict, sources: list[str], params: DownloadParams, target: Path) -> tuple[str, list[str]]:
    """Write an accepted copy of ``name`` to ``target``; returns its URL, and a line for each bad copy before."""
    failures, bad_copies = [], []
    for url in (fetch.join(base, name) for base in sources):
        try:
            sha256, _ = fetch.fetch(url, target, max(entry["copies"].values()), params)
            if sha256 not in entry["copies"]:
                raise fetch.BadCopy(f"{name}: sha256 is {sha256}, expected {' or '.join(entry['copies'])}")
            if "size" in entry:  # only now, its bytes known to be an accepted copy's, is anything decompressed
                archives.unpacked_size(target, name, limit=entry["size"])
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
                warning = f"{name}: {bad_copy}; used the copy from {redact(url)}"
                print(f"download {dataset}: warning: {warning}", file=sys.stderr)
            print(f"{name}: {(tmp / name).stat().st_size:,} bytes verified, from {redact(url)}", flush=True)


def download_stage(dataset: str) -> str:
    params = load_params(dataset, "download", DownloadParams, CONFIG_FILE)
    out_dir = DatasetPaths(dataset).raw
    download(dataset, params, CHECKSUMS_DIR / f"{dataset}.json", out_dir, os.environ.get(MIRROR_ENV) or None)
    return f"download {dataset}: every file verified -> {out_dir}"


if __name__ == "__main__":
    run(download_stage)

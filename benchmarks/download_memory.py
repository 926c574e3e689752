"""Peak memory of the download stage, on real files and on hostile ones: ``python -m benchmarks.download_memory``.

Run from the repository root, on Linux. Each case runs ``pipeline.download.download`` in a child process of its
own (this module with ``--child``) into a temporary output directory, and the table gives the child's peak RSS
and wall time; ``baseline`` is a child that only imports the stage, the interpreter's own footprint. Peak RSS
is the child's ``VmHWM`` (/proc/self/status), not ``ru_maxrss``: Linux carries the parent's high-water mark
into ``ru_maxrss`` across fork and exec, so a child of a large parent would never read below the parent.
The cases:

- ``mnist``, ``stare``: the real files, from the mirror (``--mirror``, default ``$SEGPIPE_MIRROR`` or
  /work/shared/mirror), with the shipped manifests;
- ``gzip-bomb``: MNIST's train-images file replaced by a gzip of ``--bomb-gib`` GiB of zeros (a few MB; made
  here by compressing a chunk at a time), against MNIST's manifest: refused once 47 MB have come out;
- ``big-gzip``: the same file with a manifest that lists its true size and checksum: verified whole, to show
  that memory does not grow with the size of a file;
- ``sparse-tar``: STARE's image archive replaced by 2 KiB holding a sparse member that claims 3 GiB, under a
  name the manifest does not list;
- ``endless-http``: a loopback HTTP server answering for MNIST's train-images with zeros that never end.

Nothing is asserted: the figures are for reading (targets: no case far above ``stare``, whatever it is sent).
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKSUMS = REPO / "pipeline" / "checksums"
MNIST_IMAGES = "train-images-idx3-ubyte.gz"


def peak_rss_kib() -> int:
    """This process's peak resident set size since it started (its exec), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")


def child(args: argparse.Namespace) -> None:
    """One case: download ``args.dataset`` per ``args.manifest`` from ``args.source`` into a new directory."""
    from pipeline.download import DownloadParams, download
    from pipeline.stage import StageError

    if args.dataset == "-":  # baseline: the imports only
        print(json.dumps({"outcome": "-", "peak_rss_kib": peak_rss_kib()}))
        return
    mirror, base_urls = (None, [args.source]) if args.source.startswith("http") else (args.source, [])
    params = DownloadParams(base_urls=base_urls, retries=1)
    with tempfile.TemporaryDirectory() as out:
        try:
            download(args.dataset, params, Path(args.manifest), Path(out) / args.dataset, mirror)
            outcome = "verified"
        except StageError as e:
            outcome = "refused: " + str(e).splitlines()[-1].strip().split(": ", 1)[-1]  # without the URL
    print(json.dumps({"outcome": outcome, "peak_rss_kib": peak_rss_kib()}))


def measure(dataset: str, manifest: Path | str, source: str) -> dict:
    """Run one case in a child process: its outcome, peak RSS (MiB) and wall time (s)."""
    command = [sys.executable, "-m", "benchmarks.download_memory", "--child", dataset, str(manifest), source]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"case {dataset} {manifest} failed (exit {result.returncode}):\n{result.stderr}")
    report = json.loads(result.stdout.splitlines()[-1])  # after the stage's own lines
    return {"outcome": report["outcome"], "peak_rss_mib": report["peak_rss_kib"] / 1024, "wall_s": wall}


def write_manifest(path: Path, files: dict) -> Path:
    path.write_text(json.dumps({"files": files}))
    return path


def describe(directory: Path, files: dict) -> str:
    """``<n> files, <MB> (<MB> inflated)`` for a dataset's files in ``directory`` and their manifest entries."""
    on_disk = sum((directory / name).stat().st_size for name in files)
    inflated = sum(
        entry.get("size", 0) + sum(m["size"] for m in entry.get("members", {}).values()) for entry in files.values()
    )
    return f"{len(files)} files, {on_disk / 1e6:.1f} MB ({inflated / 1e6:.0f} MB inflated)"


def zeros_sha256(size: int, chunk: int = 1 << 20) -> str:
    digest, zeros = hashlib.sha256(), bytes(chunk)
    for start in range(0, size, chunk):
        digest.update(zeros[: min(chunk, size - start)])
    return digest.hexdigest()


class EndlessZeros(http.server.BaseHTTPRequestHandler):
    """Answers every request with 200 and zeros until the client hangs up; counts what it sent."""

    sent = 0

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        chunk = bytes(1 << 16)
        try:
            while True:
                self.wfile.write(chunk)
                EndlessZeros.sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=Path(os.environ.get("SEGPIPE_MIRROR") or "/work/shared/mirror"))
    parser.add_argument("--bomb-gib", type=float, default=2.5, help="what the gzip bomb inflates to (default 2.5)")
    parser.add_argument("--child", nargs=3, metavar=("DATASET", "MANIFEST", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(argparse.Namespace(dataset=args.child[0], manifest=args.child[1], source=args.child[2]))
        return

    sys.path.insert(0, str(REPO))
    from tests.synthetic import sparse_tar, write_gzip_bomb

    mirror = args.mirror.resolve()
    mnist = json.loads((CHECKSUMS / "mnist.json").read_text())["files"]
    stare = json.loads((CHECKSUMS / "stare.json").read_text())["files"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inflated = int(args.bomb_gib * (1 << 30))
        start = time.perf_counter()
        (tmp / "bombs" / "mnist").mkdir(parents=True)
        bomb = write_gzip_bomb(tmp / "bombs" / "mnist" / MNIST_IMAGES, inflated)
        big_entry = {"gunzip_sha256": zeros_sha256(inflated), "size": inflated}
        (tmp / "bombs" / "stare").mkdir()
        (tmp / "bombs" / "stare" / "stare-images.tar").write_bytes(sparse_tar("im9999.ppm.gz", 3 << 30))
        print(
            f"made the hostile files in {time.perf_counter() - start:.0f} s: gzip bomb {bomb.stat().st_size:,} "
            f"bytes -> {inflated:,}",
            flush=True,
        )

        only_images = write_manifest(tmp / "mnist-images.json", {MNIST_IMAGES: mnist[MNIST_IMAGES]})
        cases = [
            ("baseline", "python, importing the stage", "-", "-", ""),
            (
                "mnist",
                f"real MNIST, {describe(mirror / 'mnist', mnist)}",
                "mnist",
                CHECKSUMS / "mnist.json",
                str(mirror),
            ),
            (
                "stare",
                f"real STARE, {describe(mirror / 'stare', stare)}",
                "stare",
                CHECKSUMS / "stare.json",
                str(mirror),
            ),
            (
                "gzip-bomb",
                f"{bomb.stat().st_size / 1e6:.1f} MB gzip of {args.bomb_gib:g} GiB, manifest: 47 MB",
                "mnist",
                only_images,
                str(tmp / "bombs"),
            ),
            (
                "big-gzip",
                f"the same, manifest: {args.bomb_gib:g} GiB (verified whole)",
                "mnist",
                write_manifest(tmp / "big.json", {MNIST_IMAGES: big_entry}),
                str(tmp / "bombs"),
            ),
            (
                "sparse-tar",
                "2 KiB tar, sparse member claiming 3 GiB",
                "stare",
                write_manifest(tmp / "stare-images.json", {"stare-images.tar": stare["stare-images.tar"]}),
                str(tmp / "bombs"),
            ),
        ]
        for name, what, dataset, manifest, source in cases:
            rows.append((name, what, measure(dataset, manifest, source)))
            print(f"  {name}: done", flush=True)

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EndlessZeros)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            result = measure("mnist", only_images, f"http://127.0.0.1:{httpd.server_port}/mnist")
        finally:
            httpd.shutdown()
            httpd.server_close()
        rows.append(("endless-http", f"HTTP body without end ({EndlessZeros.sent / 1e6:.0f} MB sent)", result))

    print(f"\n{'case':<13} {'what':<52} {'peak RSS':>9} {'wall':>7}  outcome")
    for name, what, result in rows:
        print(
            f"{name:<13} {what:<52} {result['peak_rss_mib']:>5.0f} MiB {result['wall_s']:>6.1f}s  {result['outcome']}"
        )


if __name__ == "__main__":
    main()

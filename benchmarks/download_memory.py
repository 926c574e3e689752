"""Peak memory of the download stage, on real files and on hostile ones: ``python -m benchmarks.download_memory``.

Run from the repository root, on Linux. Each case runs ``pipeline.download.download`` in a child process of its
own (this module with ``--child``); the table gives the child's peak RSS (``VmHWM``: Linux carries a parent's
high-water mark into ``ru_maxrss``) and wall time. ``baseline`` only imports the stage. The cases (real MNIST
and STARE from ``--mirror``; a gzip bomb refused by its sha256, accepted with MNIST's ``size``, and accepted
with its own; a sparse tar; an endless HTTP body) and their figures: docs/download.md. Nothing is asserted.
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
    inflated = sum(entry.get("size", 0) for entry in files.values())
    return f"{len(files)} files, {on_disk / 1e6:.1f} MB ({inflated / 1e6:.0f} MB inflated)"


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

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases, only_images = make_cases(Path(tmp), args.mirror.resolve(), args.bomb_gib)
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


def make_cases(tmp: Path, mirror: Path, bomb_gib: float) -> tuple[list[tuple], Path]:
    """The cases run in child processes ``(name, what, dataset, manifest, source)``, and the manifest of MNIST's
    train-images alone (the endless HTTP body's)."""
    sys.path.insert(0, str(REPO))
    from tests.synthetic import sparse_tar, write_gzip_bomb

    mnist = json.loads((CHECKSUMS / "mnist.json").read_text())["files"]
    stare = json.loads((CHECKSUMS / "stare.json").read_text())["files"]
    inflated, start, bombs = int(bomb_gib * (1 << 30)), time.perf_counter(), tmp / "bombs"
    (bombs / "mnist").mkdir(parents=True)
    bomb = write_gzip_bomb(bombs / "mnist" / MNIST_IMAGES, inflated)
    bomb_copy = {hashlib.sha256(bomb.read_bytes()).hexdigest(): bomb.stat().st_size}
    (bombs / "stare").mkdir()
    (bombs / "stare" / "stare-images.tar").write_bytes(sparse_tar("im9999.ppm.gz", 3 << 30))
    print(f"made the hostile files in {time.perf_counter() - start:.0f} s: gzip bomb {bomb.stat().st_size:,} bytes")
    only_images = write_manifest(tmp / "mnist-images.json", {MNIST_IMAGES: mnist[MNIST_IMAGES]})
    accepted = {MNIST_IMAGES: {"copies": bomb_copy, "size": mnist[MNIST_IMAGES]["size"]}}
    big = {MNIST_IMAGES: {"copies": bomb_copy, "size": inflated}}
    sparse = {"stare-images.tar": stare["stare-images.tar"]}
    gzip_bomb = f"{bomb.stat().st_size / 1e6:.1f} MB gzip of {bomb_gib:g} GiB"
    cases = [
        ("baseline", "python, importing the stage", "-", "-", ""),
        ("mnist", f"real MNIST, {describe(mirror / 'mnist', mnist)}", "mnist", CHECKSUMS / "mnist.json", str(mirror)),
        ("stare", f"real STARE, {describe(mirror / 'stare', stare)}", "stare", CHECKSUMS / "stare.json", str(mirror)),
        ("gzip-bomb", f"{gzip_bomb}, not an accepted copy", "mnist", only_images, str(bombs)),
        ("accepted-bomb", "the same, accepted, manifest size: 47 MB", "mnist", tmp / "accepted.json", str(bombs)),
        ("big-gzip", f"the same, accepted, manifest size: {bomb_gib:g} GiB", "mnist", tmp / "big.json", str(bombs)),
        ("sparse-tar", "2 KiB tar, sparse member claiming 3 GiB", "stare", tmp / "sparse.json", str(bombs)),
    ]
    for path, files in ((tmp / "accepted.json", accepted), (tmp / "big.json", big), (tmp / "sparse.json", sparse)):
        write_manifest(path, files)
    return cases, only_images


if __name__ == "__main__":
    main()

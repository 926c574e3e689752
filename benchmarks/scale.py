"""The pipeline at Cityscapes' scale: ``python -m benchmarks.scale [--images N] [--workdir DIR] [--keep]``.

Generates a synthetic, seeded folder dataset the size of Cityscapes' fine annotations -- 2,975 train, 500 val
and 500 test images of 2048 x 1024 RGB with 19-class index masks (255: a few ignored pixels), PNG files,
about 25 GB of decoded RGB pixels (33 GB with the masks) -- in a temporary project of its own (git, DVC with
linked cache types, a local DVC remote), and drives the real commands on it, as a user would:

1. ``python -m pipeline.manifest --dataset city`` (the sha256 of every file);
2. ``dvc repro -s download@city`` (copies and verifies them into ``data/raw/city``);
3. the machine's ceiling for prepare's work: the same PNGs decoded with Pillow on every usable core (a
   multiprocessing Pool over the files), the decoded bytes written to a file;
4. ``dvc repro -s prepare@city``, ``train@city`` (a short recipe: a few hundred 256 x 256 patches, one epoch,
   its validation pass over the whole val split included), ``evaluate@city`` (no TTA) and ``render@city``;
   after train, a probe of the loader's patches/s (train's own augmenting loader, one worker) beside the
   model's training steps/s;
5. ``python -m pipeline.predict city`` on a handful of test images;
6. ``dvc push`` to the local remote; then 30 more images (0.75 %), a new manifest, ``dvc repro evaluate@city
   render@city`` (every stage) and ``dvc push`` again: the bytes added to the DVC cache and pushed to the remote,
   each as a share of the total.

A failed step stops the steps after it, except the loader probe, render and predict (reported, then the rest).

Each command runs as a child process, polled every 0.1 s with psutil: wall time, the stage's own time (its
``python -m pipeline.<stage>`` processes, from start to exit, without DVC's hashing before and after), the peak
memory of the stage's processes summed as PSS (each shared page counted once: the forked loader worker shares
torch and the model with the training process), and of the whole tree with DVC.
MB/s is the decoded bytes (images and masks, 4 bytes a pixel) a stage processed over the stage's own time;
for manifest and download, the PNG bytes. Targets: every stage's peak RSS <= 2 GiB; prepare >= 70 % of the
ceiling's images/s; appending ~1 % of the images adds <= 3 % of the cache's and the remote's bytes.

Disk: it checks the free space first and prints what it needs (source PNGs, their verified copy, the prepared
shards, the remote's copy of both, and the re-run's transients); where the disk holds fewer images than asked,
it takes as many as fit and says so, but never fewer than 1,000 (or than asked, when fewer were). The DVC cache
is linked (``hardlink,symlink``; reflinks first where the file system makes them), so it does not hold a second
copy of the data.

``--images N`` (total, default 3,975) for quicker runs; ``--workdir DIR`` to work there; ``--keep`` to leave
everything in place (a later run in the same workdir with the same size and seed reuses the generated images;
the project is rebuilt each time); ``--remote DIR`` for the DVC remote (another disk); ``--out FILE`` for the JSON of
every figure (default ``benchmarks/results/scale.json``).
See benchmarks/README.md, "Scale".
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET = "city"
# Cityscapes' fine annotations: 2,975 train, 500 val, 500 test images of 2048 x 1024, 19 training classes.
CITYSCAPES = {"train": 2975, "val": 500, "test": 500}
FULL_IMAGES = sum(CITYSCAPES.values())
WIDTH, HEIGHT = 2048, 1024
MIN_IMAGES = 1000  # when the disk holds fewer than asked: never fewer than this (or than asked)
APPEND_SHARE = 30 / FULL_IMAGES  # 30 images at full size
IGNORE = 255
CLASSES = [  # Cityscapes' 19 training classes and their colours
    ("road", (128, 64, 128)),
    ("sidewalk", (244, 35, 232)),
    ("building", (70, 70, 70)),
    ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)),
    ("pole", (153, 153, 153)),
    ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)),
    ("vegetation", (107, 142, 35)),
    ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)),
    ("person", (220, 20, 60)),
    ("rider", (255, 0, 0)),
    ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)),
    ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)),
    ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
]
GENERATOR_VERSION = 1  # bump when make_sample changes: a kept workdir's images are then generated again
RSS_TARGET_MIB = 2048
CEILING_TARGET = 0.70
APPEND_TARGET = 0.03
POLL_S = 0.1
FICLONE = 0x40049409  # linux/fs.h: ioctl(dst, FICLONE, src), a reflink


# ------------------------------------------------------------------------------------------ the dataset


def make_sample(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image uint8 (H, W, 3), mask uint8 (H, W) of classes 0-18, 255 ignored) of image ``index``: a
    background class and 8-16 rectangles of random classes, each class a colour of its own (jittered per image),
    under a smooth shading and +-1 of pixel noise (about 2.3 MB of PNG at 2048 x 1024, like Cityscapes')."""
    rng = np.random.default_rng([seed, index])
    mask = np.full((height, width), rng.integers(0, len(CLASSES)), np.uint8)
    for _ in range(int(rng.integers(8, 17))):
        h, w = int(rng.integers(height // 16, height // 2)), int(rng.integers(width // 16, width // 3))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        mask[y : y + h, x : x + w] = rng.integers(0, len(CLASSES))
    y = int(rng.integers(0, height - 2))
    mask[y : y + 2, : width // 4] = IGNORE  # a few ignored pixels (an unlabelled strip)
    colors = np.full((256, 3), 128, np.int16)
    colors[: len(CLASSES)] = np.array([c for _, c in CLASSES]) + rng.integers(-20, 21, (len(CLASSES), 3))
    image = colors[mask]
    block = max(8, min(height, width) // 16)
    coarse = rng.integers(-24, 25, (height // block + 1, width // block + 1, 1), dtype=np.int16)
    image += np.repeat(np.repeat(coarse, block, 0), block, 1)[:height, :width]
    image += rng.integers(-1, 2, (height, width, 3), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def image_id(index: int) -> str:
    return f"c{index:05d}"


def split_counts(n: int) -> dict[str, int]:
    """Cityscapes' proportions for ``n`` images; at least one train and one test image, a val image from 3."""
    val = max(1 if n >= 3 else 0, round(n * CITYSCAPES["val"] / FULL_IMAGES))
    test = max(1, round(n * CITYSCAPES["test"] / FULL_IMAGES))
    return {"train": n - val - test, "val": val, "test": test}


def assign_splits(first: int, count: int, seed: int) -> dict[str, str]:
    """``{id: split}`` of images ``first`` .. ``first + count - 1``: Cityscapes' proportions by a seeded shuffle.
    Appended images are assigned on their own, so no earlier image changes split."""
    counts = (
        split_counts(count)
        if first == 0
        else {
            "val": round(count * CITYSCAPES["val"] / FULL_IMAGES),
            "test": round(count * CITYSCAPES["test"] / FULL_IMAGES),
        }
    )
    order = np.random.default_rng([seed, first]).permutation(count) + first
    n_val, n_test = counts["val"], counts["test"]
    return {
        image_id(int(i)): ("val" if k < n_val else "test" if k < n_val + n_test else "train")
        for k, i in enumerate(order)
    }


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _generate_one(job: tuple[Path, int, int, int, int]) -> int:
    """Write image ``index``'s PNGs (each under a temporary name, then renamed); returns their bytes."""
    root, seed, index, height, width = job
    name = f"{image_id(index)}.png"
    image_path, mask_path = root / "images" / name, root / "masks" / name
    if image_path.exists() and mask_path.exists():  # a kept workdir: generated by an earlier run, same recipe
        return image_path.stat().st_size + mask_path.stat().st_size
    image, mask = make_sample(seed, index, height, width)
    for path, array in ((image_path, image), (mask_path, mask)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(_png(array))
        os.replace(tmp, path)
    return image_path.stat().st_size + mask_path.stat().st_size


def _sample_bytes(job: tuple[int, int, int, int]) -> int:
    seed, index, height, width = job
    image, mask = make_sample(seed, index, height, width)
    return len(_png(image)) + len(_png(mask))


def generate(pool, root: Path, seed: int, first: int, count: int, height: int, width: int) -> tuple[float, int]:
    """Images ``first`` .. ``first + count - 1`` into ``root``; (seconds, PNG bytes)."""
    start = time.perf_counter()
    total, done, step = 0, 0, max(1, count // 10)
    jobs = [(root, seed, i, height, width) for i in range(first, first + count)]
    for size in pool.imap_unordered(_generate_one, jobs, chunksize=max(1, min(16, count // 32))):
        total += size
        done += 1
        if count >= 100 and done % step == 0:
            print(f"  generated {done:,}/{count:,} images ({time.perf_counter() - start:.0f} s)", flush=True)
    return time.perf_counter() - start, total


def write_split_file(root: Path, splits: dict[str, str]) -> None:
    (root / "split.txt").write_text("".join(f"{i} {s}\n" for i, s in sorted(splits.items())))


def prepare_source(root: Path, seed: int, n: int, height: int, width: int) -> None:
    """``root`` ready for images 0 .. n-1: leftovers of an earlier run with another recipe, or beyond n, removed.
    The recipe is recorded beside it (inside, it would be one more file of the dataset)."""
    recipe = {"version": GENERATOR_VERSION, "seed": seed, "height": height, "width": width}
    marker = root.with_name(root.name + ".json")
    if root.exists() and (not marker.exists() or json.loads(marker.read_text()) != recipe):
        shutil.rmtree(root)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for path in (root / sub).iterdir():
            number = re.fullmatch(r"c(\d{5})\.png", path.name)
            if number is None or int(number[1]) >= n:
                path.unlink()
    marker.write_text(json.dumps(recipe))


# ------------------------------------------------------------------------------------------ the machine, the disk


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    versions = {}
    for package in ("torch", "dvc", "pillow", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpu": model,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "cores": len(os.sched_getaffinity(0)),
        "memory_bytes": int(total[1]) * 1024 if total else None,
        "versions": versions,
    }


def reflinks_work(directory: Path) -> bool:
    """Whether ``directory``'s file system makes reflinks (DVC's first cache type here)."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        source, target = Path(tmp) / "a", Path(tmp) / "b"
        source.write_bytes(b"x" * 4096)
        with open(source, "rb") as src, open(target, "wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError:
                return False
    return True


@dataclass
class DiskPlan:
    images: int  # initial images that fit (or were asked for)
    asked: int
    append: int
    png_per_image: float
    prepared_per_image: float
    per_image: dict  # phase component -> bytes per image on the workdir's file system
    remote_per_image: float  # on the remote's file system, when it is another one
    need: float  # bytes on the workdir's file system, all images
    remote_need: float
    free: int
    remote_free: int | None
    margin: float
    reflink: bool
    need_asked: tuple[float, float] = (0.0, 0.0)  # (workdir, remote) for the images asked for

    def lines(self) -> list[str]:
        n = self.images + self.append
        GB = 1e9
        parts = ", ".join(f"{name} {value * n / GB:,.1f} GB" for name, value in self.per_image.items())
        out = [
            f"disk: {n:,} images need about {self.need / GB:,.1f} GB free at the peak (the re-run), this disk has "
            f"{self.free / GB:,.1f} GB: {parts}, margin {self.margin / GB:,.1f} GB "
            f"({self.png_per_image / 1e6:.2f} MB of PNG and {self.prepared_per_image / 1e6:.2f} MB prepared per "
            f"image; DVC cache linked: {'reflinks' if self.reflink else 'hardlinks'})"
        ]
        if self.images < self.asked:
            out.append(
                f"disk: the {self.asked:,} images asked for would need {self.need_asked[0] / GB:,.1f} GB"
                + ("" if self.remote_free is None else f" and {self.need_asked[1] / GB:,.1f} GB for the remote")
            )
        if self.remote_free is not None:
            out.append(
                f"disk: the remote's file system needs {self.remote_need / GB:,.1f} GB, has "
                f"{self.remote_free / GB:,.1f} GB"
            )
        return out


def plan_disk(
    workdir: Path,
    remote: Path,
    asked: int,
    append_share: float,
    png_per_image: float,
    height: int,
    width: int,
    explicit_append: int | None,
) -> DiskPlan:
    """How many images fit, with what they need. Per image, on the workdir's file system: the source PNGs, the
    download's verified copy (the DVC cache linked to it, not a copy), the prepared shards (image, mask and field
    of view: 5 bytes a pixel; linked too), the remote's copy of both (when it is on the same file system), and
    the re-run's transients: download's fresh copy before DVC links it, and -- with hardlinks, not reflinks --
    the prepared shards again, since DVC copies a persistent output's linked files before its stage runs
    ("Unprotecting"). The ceiling's scratch file (4 bytes a pixel) comes and goes before any of the last three."""
    reflink = reflinks_work(workdir)
    prepared = height * width * 5 + 3 * 1536  # three .npy members: tar and npy headers
    same = os.stat(workdir).st_dev == os.stat(remote.parent).st_dev
    per_image = {"source PNGs": png_per_image, "data/raw": png_per_image, "data/prepared": prepared}
    if same:
        per_image["remote"] = png_per_image + prepared
    per_image["re-run transients"] = png_per_image + (0 if reflink else prepared)
    per = sum(per_image.values())
    fixed = 1e9  # the venv's copy of the code, models, logs, DVC's own files
    free = shutil.disk_usage(workdir).free
    remote_free = None if same else shutil.disk_usage(remote.parent).free
    remote_per = 0 if same else png_per_image + prepared

    def appended(n: int) -> int:
        return explicit_append if explicit_append is not None else max(1, round(n * append_share))

    def need(n: int) -> tuple[float, float]:
        total = n + appended(n)
        return fixed + 1.05 * per * total, 1.05 * remote_per * total

    def fits(n: int) -> bool:
        local, elsewhere = need(n)
        return local <= free and (remote_free is None or elsewhere <= remote_free)

    low, high = 0, asked  # the most images that fit: fits() is monotonic in n
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    n = max(low, 1)
    plan = DiskPlan(
        low,
        asked,
        appended(n),
        png_per_image,
        prepared,
        per_image,
        remote_per,
        *need(n),
        free,
        remote_free,
        fixed + 0.05 * per * (n + appended(n)),
        reflink,
    )
    plan.need_asked = need(asked)
    return plan


# ------------------------------------------------------------------------------------------ measured commands


STAGE_PATTERN = re.compile(r"-m\s+(pipeline\.\w+|benchmarks\.scale)")


@dataclass
class Measured:
    """A command's wall time, exit status, peak memory, and its stages' own times and peaks."""

    label: str
    rc: int
    wall_s: float
    tree_peak: int  # bytes: the peak of the whole process tree's memory, summed as PSS (DVC included)
    largest_process: int  # bytes: the largest single process (wait4's ru_maxrss over the tree)
    stages: dict = field(default_factory=dict)  # stage name -> {"s": seconds, "peak": bytes}
    log: str = ""

    def stage(self, name: str) -> dict:
        return self.stages.get(name, {"s": None, "peak": None})

    def tail(self, lines: int = 40) -> str:
        text = Path(self.log).read_text(errors="replace") if self.log and Path(self.log).exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _label(cmdline: list[str]) -> str | None:
    match = STAGE_PATTERN.search(" ".join(cmdline))
    if not match:
        return None
    return match[1].split(".", 1)[1] if match[1].startswith("pipeline.") else "probe"


def measure(label: str, args: list[str], cwd: Path, env: dict, logs: Path, echo: bool = False) -> Measured:
    """Run ``args``; poll its process tree every POLL_S for memory (PSS), each process labelled by the stage whose
    command
    line it carries (``-m pipeline.<stage>``; a forked worker carries its parent's)."""
    import psutil

    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.log"
    print(f"- {label}: {' '.join(map(str, args))}", flush=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    stop = threading.Event()
    seen: dict[tuple[int, float], dict] = {}
    peaks: dict[str, int] = defaultdict(int)
    tree_peak = 0

    def poll() -> None:
        nonlocal tree_peak
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
            except psutil.Error:  # reaped: the command is over
                break
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:  # a process of the tree ended while it was listed: list it again
                stop.wait(0.01)
                continue
            labels: dict[int, str | None] = {}
            sums: dict[str, int] = defaultdict(int)
            total = 0
            for p in tree:  # parents before their children
                try:
                    # Read each time: a process that execs another command keeps its pid (a shell's last command).
                    name = _label(p.cmdline()) or labels.get(p.ppid())
                    key = (p.pid, p.create_time(), name)
                    # PSS: a page shared by several processes (the loader worker forked from the training
                    # process shares torch and the model with it) counts once, in parts, not once per process.
                    rss = p.memory_full_info().pss
                except psutil.Error:
                    continue
                labels[p.pid] = name
                if key not in seen:  # from its start; a process that exec'd this command, from now
                    execed = any(k[:2] == key[:2] for k in seen)
                    seen[key] = {"label": name, "first": time.time() if execed else key[1]}
                seen[key]["last"] = time.time()
                total += rss
                if name:
                    sums[name] += rss
            tree_peak = max(tree_peak, total)
            for name, value in sums.items():
                peaks[name] = max(peaks[name], value)
            stop.wait(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stop.set()
    poller.join()
    stages: dict[str, dict] = {}
    for info in seen.values():
        name = info["label"]
        if not name:
            continue
        entry = stages.setdefault(name, {"first": info["first"], "last": info.get("last", info["first"])})
        entry["first"] = min(entry["first"], info["first"])
        entry["last"] = max(entry["last"], info.get("last", info["first"]))
    stages = {
        name: {"s": round(min(e["last"] - e["first"], wall), 2), "peak": peaks.get(name, 0)}
        for name, e in stages.items()
    }
    result = Measured(label, proc.returncode, wall, tree_peak, usage.ru_maxrss * 1024, stages, str(log))
    state = "ok" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
    print(f"  {state}: {wall:.1f} s, peak {mib(tree_peak)} MiB (tree, PSS)", flush=True)
    if echo or proc.returncode != 0:
        print("  | " + result.tail().replace("\n", "\n  | "), flush=True)
    return result


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def tree_bytes(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root``, each inode once (hard links are one file)."""
    seen, total = set(), 0
    if not root.exists():
        return 0, 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(directory, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_size
    return total, len(seen)


def cache_objects(cache: Path) -> dict[str, int]:
    """``{md5 (with .dir): bytes}`` of the objects in a DVC 3 cache or local remote."""
    objects = {}
    base = cache / "files" / "md5"
    if base.exists():
        for prefix in base.iterdir():
            for path in prefix.iterdir():
                objects[prefix.name + path.name] = path.stat().st_size
    return objects


def added_by_output(project: Path, new: dict[str, int], cache: Path) -> list[str]:
    """Of the new cache objects, which output of dvc.lock each belongs to: files and bytes."""
    import yaml

    lines = []
    try:
        lock = yaml.safe_load((project / "dvc.lock").read_text())
    except (OSError, yaml.YAMLError):
        return lines
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            md5 = out.get("md5", "")
            if md5.endswith(".dir"):
                try:
                    entries = json.loads((cache / "files/md5" / md5[:2] / md5[2:]).read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                hits = [e for e in entries if e.get("md5") in new]
                if hits:
                    lines.append(
                        f"{out['path']}: {len(hits):,} of {len(entries):,} files new, "
                        f"{gb(sum(new[e['md5']] for e in hits))}"
                    )
            elif md5 in new:
                lines.append(f"{out['path']}: new, {gb(new[md5])}")
    return lines


# ------------------------------------------------------------------------------------------ the ceiling


def _decode_into(job: tuple[str, str]) -> tuple[int, int]:
    """Decode one PNG with Pillow and append its pixels to this worker's own scratch file; (bytes, pixels)."""
    from PIL import Image

    path, scratch = job
    with Image.open(path) as image:
        data = np.asarray(image)
    with open(f"{scratch}.{os.getpid()}", "ab") as out:
        out.write(data.tobytes())
    return data.nbytes, data.shape[0] * data.shape[1]


def ceiling(files: list[Path], scratch: Path, cores: int) -> dict:
    """The same PNGs decoded with Pillow on ``cores`` processes, the decoded bytes written to files."""
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        done = list(pool.imap_unordered(_decode_into, [(str(f), str(scratch / "decoded")) for f in files], chunksize=4))
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return {"s": seconds, "bytes": sum(b for b, _ in done), "files": len(files), "processes": cores}


# ------------------------------------------------------------------------------------------ the loader probe


def probe(arguments: dict) -> dict:
    """In the project (a child process): the loader's patches/s and the model's training steps/s.

    The loader: the train stage's own ``AugmentedBatches`` over the prepared train split, iterated through its
    ``augmenting_loader`` (pipeline/loader.py: one worker process, as the stage runs it) with nothing consuming
    the batches, so that the rate is the worker's; the first batch (the worker's start) is not timed. Where the
    loader does not read the shards (``AugmentedBatches`` taking arrays, not a split), only the breakdown below is
    measured.
    The breakdown, in this process: a training sample read from the shards (``open_split(...).read(i)``), its
    field of view applied, then cut and flipped by the stage's ``build_augmentation`` (pipeline/augment.py), per
    patch. The model: forward, cross-entropy (pipeline/losses.py), backward and Adam on batches of such patches,
    with the stage's thread count."""
    import inspect

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from pipeline import losses
    from pipeline.augment import AugmentParams, build_augmentation
    from pipeline.loader import AugmentedBatches
    from pipeline.prepared import open_split
    from pipeline.runtime import setup

    device = setup(arguments["seed"], None)
    split = open_split(Path("data/prepared") / arguments["dataset"], "train", verify=False)
    patch, seed = arguments["patch"], arguments["seed"]
    augment = build_augmentation(AugmentParams(flips=True), patch, seed, losses.IGNORE)
    rng = np.random.default_rng(seed)

    found: dict = {}
    if list(inspect.signature(AugmentedBatches).parameters)[0] == "split":
        found["loader"] = _probe_loader(arguments, split, augment, rng, device)
    found["breakdown"], by_hand, patches = _probe_by_hand(arguments, split, augment, rng)
    found.setdefault("loader", by_hand)
    found["model"] = _probe_model(arguments, patches, device)
    return found


def _probe_loader(arguments: dict, split, augment, rng: np.random.Generator, device) -> dict:
    """The stage's loader, its worker's rate: ``patches`` patches in batches of ``batch``, the first untimed."""
    from pipeline.loader import AugmentedBatches, augmenting_loader

    batch, seed, n = arguments["batch"], arguments["seed"], arguments["patches"]
    batches = AugmentedBatches(split, rng.integers(0, len(split), n + batch), batch, augment, seed, 0)
    with augmenting_loader(batches, device) as loader:
        iterator = iter(loader)
        next(iterator)  # the worker's start
        start, patches = time.perf_counter(), 0
        for images, _ in iterator:
            patches += len(images)
        seconds = time.perf_counter() - start
    return {
        "patches": patches,
        "s": seconds,
        "patches_per_s": patches / seconds,
        "how": "train's augmenting_loader, 1 worker",
    }


def _probe_by_hand(arguments: dict, split, augment, rng: np.random.Generator) -> tuple[dict, dict, list]:
    """One patch at a time, read and augmented in this process: the breakdown, the loader's figures it stands in
    for where the loader cannot be probed, and the first ``batch`` patches (the model's batch)."""
    from pipeline import losses

    batch, n = arguments["batch"], arguments["patches"]
    read_s = augment_s = 0.0
    patches = []
    for _ in range(n):
        t0 = time.perf_counter()
        sample = split.read(int(rng.integers(len(split))), ("image", "mask", "fov"))
        target = sample.mask if sample.fov is None else np.where(sample.fov, sample.mask, np.uint8(losses.IGNORE))
        t1 = time.perf_counter()
        out = augment(image=sample.image, mask=target)
        t2 = time.perf_counter()
        read_s, augment_s = read_s + t1 - t0, augment_s + t2 - t1
        if len(patches) < batch:
            patches.append((out["image"], out["mask"]))
    breakdown = {
        "patches": n,
        "read_ms": 1000 * read_s / n,
        "augment_ms": 1000 * augment_s / n,
        "patches_per_s": n / (read_s + augment_s),
    }
    loader = {
        "patches": n,
        "s": read_s + augment_s,
        "patches_per_s": n / (read_s + augment_s),
        "how": "read + augment in one process (train's loader does not read shards yet)",
    }
    return breakdown, loader, patches


def _probe_model(arguments: dict, patches: list, device) -> dict:
    """Training steps/s of the network on one batch of ``patches``: forward, cross-entropy, backward, Adam."""
    import torch

    from pipeline.inference import to_input
    from pipeline.losses import LOSSES
    from pipeline.models import build_model

    model = (
        build_model(
            {"arch": arguments["arch"], "in_channels": 3, "out_channels": len(CLASSES), "width": arguments["width"]}
        )
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = np.stack([p[0] for p in patches])
    targets = torch.from_numpy(np.stack([p[1] for p in patches])).to(device)
    cross_entropy = LOSSES["cross_entropy"]["multiclass"]
    model.train()

    def step() -> None:
        loss = cross_entropy(model(to_input(images, device)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    steps, start = arguments["steps"], time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "batch": len(images),
        "steps_per_s": steps / seconds,
        "patches_per_s": steps * len(images) / seconds,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------ the project


def make_project(project: Path, remote: Path, params: dict, reflink: bool) -> dict:
    """This repository's code (as it stands in the working tree) in ``project``, a fresh git repository whose
    params.yaml (and config.yaml, its sources) hold the synthetic dataset alone; DVC's cache linked, a local
    remote. Returns the env.

    The cache types are ``reflink,hardlink,symlink`` only where reflinks work: elsewhere (ext4) DVC 3.67 leaves
    the outputs of ``dvc repro`` as copies beside the cache's under that list, whose first type decides how
    a stage's outputs are committed, so ``hardlink,symlink`` there."""
    import yaml

    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        path = REPO / name
        if name.startswith(("data/", "metrics/")) or name == "dvc.lock" or not path.is_file():
            continue
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, project / name)
    params = {name: dict(section) if isinstance(section, dict) else section for name, section in params.items()}
    sources = {DATASET: {"download": params[DATASET].pop("download")}}  # config.yaml's, as the README says
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "config.yaml").write_text(yaml.safe_dump(sources, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "SEGPIPE_MIRROR"}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "DVC_NO_ANALYTICS": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONUNBUFFERED": "1",
            "GIT_AUTHOR_NAME": "scale",
            "GIT_AUTHOR_EMAIL": "scale@example.com",
            "GIT_COMMITTER_NAME": "scale",
            "GIT_COMMITTER_EMAIL": "scale@example.com",
        }
    )
    for args in (
        ["git", "init", "-q", "-b", "main"],
        [
            sys.executable,
            "-m",
            "dvc",
            "config",
            "cache.type",
            "reflink,hardlink,symlink" if reflink else "hardlink,symlink",
        ],
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "bench", str(remote)],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "scale benchmark"],
    ):
        subprocess.run(args, cwd=project, env=env, check=True, capture_output=True)
    return env


def project_params(source: Path, patch: int, samples: int, width: int) -> dict:
    return {
        "datasets": {DATASET: "folder"},
        DATASET: {
            "download": {"base_urls": [str(source)], "retries": 1},
            "prepare": {
                "images": "images/{id}.png",
                "masks": "masks/{id}.png",
                "task": "multiclass",
                "mask_encoding": "index",
                "ignore_value": IGNORE,
                "classes": [{"name": name, "color": list(color)} for name, color in CLASSES],
                "split": {"method": "file", "file": "split.txt"},
            },
            "train": {
                "arch": "vgg_unet",
                "width": width,
                "epochs": 1,
                "batch_size": 8,
                "lr": 0.01,
                "schedule": "onecycle",
                "loss": "cross_entropy",
                "patch_size": patch,
                "samples_per_epoch": samples,
                "augment": {"flips": True},
                "val_batch_size": 1,
                "seed": 0,
            },
            "evaluate": {"batch_size": 1, "tta": "none"},
            "render": {"grid": 1, "alpha": 0.5, "scale": 1, "batch_size": 1},
        },
    }


# ------------------------------------------------------------------------------------------ the table


def _fmt(value, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def rss_check(peak: int | None) -> str:
    if peak is None:
        return ""
    return "ok" if peak <= RSS_TARGET_MIB * 2**20 else "OVER"


def stage_row(name: str, run: Measured | None, stage: str | None, data: str, mb: float | None, rate: str = "") -> dict:
    """A table row of a measured command; with ``stage``, its figures are that stage's processes' own."""
    row = {
        "step": name,
        "wall_s": None,
        "stage_s": None,
        "peak": None,
        "tree": None,
        "data": data,
        "mb_s": None,
        "rate": rate,
        "check": "not run",
    }
    if run is None:
        return row
    own = run.stage(stage) if stage else {"s": None, "peak": None}
    row.update(wall_s=run.wall_s, stage_s=own["s"], peak=own["peak"] if stage else None, tree=run.tree_peak)
    if run.rc != 0:
        row["check"] = f"FAILED (exit {run.rc})"
        return row
    seconds = own["s"] or run.wall_s
    row["mb_s"] = None if mb is None else mb / 1e6 / seconds
    row["check"] = f"RSS <= 2 GiB: {rss_check(own['peak'])}" if stage else ""
    return row


def note_row(
    name: str, data: str = "", rate: str = "", check: str = "", seconds: float | None = None, mb_s: float | None = None
) -> dict:
    return {
        "step": name,
        "wall_s": None,
        "stage_s": seconds,
        "peak": None,
        "tree": None,
        "data": data,
        "mb_s": mb_s,
        "rate": rate,
        "check": check,
    }


def print_table(rows: list[dict]) -> None:
    header = ["step", "wall s", "stage s", "peak MiB", "tree MiB", "data", "MB/s", "rate", "target"]
    cells = [
        [
            r["step"],
            _fmt(r["wall_s"]),
            _fmt(r["stage_s"]),
            mib(r["peak"]),
            mib(r["tree"]),
            r["data"],
            _fmt(r["mb_s"], ",.0f"),
            r["rate"],
            r["check"],
        ]
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    line = "  ".join
    print(line(h.ljust(w) for h, w in zip(header, widths)))
    print(line("-" * w for w in widths))
    for c in cells:
        print(
            line(str(v).ljust(w) if i in (0, 5, 7, 8) else str(v).rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        )


def gb(value: float) -> str:
    """Bytes in GB, or MB / kB where that says more (small runs)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value / 1e3:,.1f} kB"


# ------------------------------------------------------------------------------------------ main


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 32 or int(match[2]) < 32:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, each at least 32, got {text!r}")
    return int(match[1]), int(match[2])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=FULL_IMAGES,
        help=f"images in all, split as Cityscapes' (default {FULL_IMAGES:,}, or as many as the disk holds)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="work here, in its subfolders source, project, remote, logs, "
        "predictions and scratch (default: a temporary directory)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the workdir in place (the project, the images)")
    parser.add_argument("--remote", type=Path, help="the DVC remote's directory (default: in the workdir)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/scale.json", help="the JSON of the figures"
    )
    parser.add_argument("--append", type=int, help="images appended before the re-run (default 0.75 %%: 30 of 3,975)")
    parser.add_argument("--seed", type=int, default=0, help="of the generated images")
    parser.add_argument("--verbose", action="store_true", help="print every command's output")
    parser.add_argument("--size", type=parse_size, default=(WIDTH, HEIGHT), help=argparse.SUPPRESS)  # tests: 128x64
    parser.add_argument("--samples", type=int, default=320, help=argparse.SUPPRESS)  # training patches
    parser.add_argument("--width", type=int, default=8, help=argparse.SUPPRESS)  # of the network
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the loader probe's JSON arguments
    args = parser.parse_args(argv)
    if args.probe:
        arguments = json.loads(args.probe)
        Path(arguments["out"]).write_text(json.dumps(probe(arguments)))
        return 0
    if args.images < 3:
        parser.error("--images: at least 3 (a train, a val and a test image)")
    if args.append is not None and args.append < 1:
        parser.error("--append: at least 1")

    width, height = args.size
    info = machine()
    cores = info["cores"]
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="segpipe-scale-")) if temporary else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source, project, logs = workdir / "source", workdir / "project", workdir / "logs"
    remote = (args.remote or workdir / "remote").resolve()
    for path in (project, logs, workdir / "predictions", workdir / "scratch", remote):
        shutil.rmtree(path, ignore_errors=True)
    remote.parent.mkdir(parents=True, exist_ok=True)
    isa = ", ".join(f"{flag} {'yes' if info[flag] else 'no'}" for flag in ("avx512_bf16", "avx512f", "avx2"))
    print(
        f"CPU: {info['cpu']} ({isa}), {cores} usable cores, "
        f"{(info['memory_bytes'] or 0) / 2**30:,.1f} GiB memory; "
        f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}"
    )
    print(f"workdir: {workdir}")

    results: dict = {"machine": info, "size": [width, height], "workdir": str(workdir)}
    rows: list[dict] = []
    runs: dict[str, Measured] = {}
    problems: list[str] = []  # steps that failed but did not stop the run (probe, render, predict)
    failed: str | None = None  # the step that stopped the run
    context = multiprocessing.get_context("fork")
    try:
        with context.Pool(cores) as pool:
            png = sum(pool.map(_sample_bytes, [(args.seed, i, height, width) for i in range(2)])) / 2
            plan = plan_disk(workdir, remote, args.images, APPEND_SHARE, png, height, width, args.append)
            for line in plan.lines():
                print(line)
            floor = min(MIN_IMAGES, args.images)
            if plan.images < floor:
                print(
                    f"error: the disk holds {plan.images:,} images, fewer than {floor:,}; "
                    f"{args.images:,} need {gb(plan.need_asked[0])} free on {workdir}"
                    + ("" if plan.remote_free is None else f" and {gb(plan.need_asked[1])} on {remote.parent}"),
                    file=sys.stderr,
                )
                results["error"] = "not enough disk"
                return 2
            n, append = plan.images, plan.append
            if n < args.images:
                print(f"the disk holds {n:,} of the {args.images:,} images asked for: taking {n:,}")
            counts = split_counts(n)
            pixels = height * width
            decoded = (n * pixels * 4, n * pixels * 3)  # images and masks; images alone
            print(
                f"dataset: {n:,} images of {width}x{height} (train {counts['train']:,}, val {counts['val']:,}, "
                f"test {counts['test']:,}), 19 classes; {gb(decoded[1])} of decoded RGB pixels, {gb(decoded[0])} with "
                f"the masks, against {(info['memory_bytes'] or 0) / 1e9:,.1f} GB of memory; then {append} appended "
                f"({100 * append / n:.2f} %)"
            )
            results.update(images=n, asked=args.images, append=append, splits=counts, disk=vars(plan))

            prepare_source(source, args.seed, n, height, width)
            splits = assign_splits(0, n, args.seed)
            write_split_file(source, splits)
            print(f"- generating {n:,} images on {cores} processes", flush=True)
            gen_s, png_bytes = generate(pool, source, args.seed, 0, n, height, width)
            print(f"  {gen_s:.1f} s, {gb(png_bytes)} of PNG ({png_bytes / n / 1e6:.2f} MB per image with its mask)")
            results["generate"] = {"s": gen_s, "png_bytes": png_bytes}

        patch = min(256, min(height, width) // 16 * 16)
        samples = args.samples
        project.mkdir(parents=True)
        env = make_project(project, remote, project_params(source, patch, samples, args.width), plan.reflink)
        python = sys.executable
        dvc = [python, "-m", "dvc"]

        def step(name: str, command: list[str], required: bool = True) -> Measured | None:
            """Run a step unless one that was required failed; a failed required step stops the rest."""
            nonlocal failed
            if failed:
                return None
            run = measure(name, command, project, env, logs, args.verbose)
            runs[name] = run
            if run.rc != 0:
                if required:
                    failed = name
                else:
                    problems.append(name)
            return run

        def own_s(run: Measured | None, stage: str) -> float | None:
            return None if run is None or run.rc else (run.stage(stage)["s"] or run.wall_s)

        manifest = step("manifest", [python, "-m", "pipeline.manifest", "--dataset", DATASET])
        rows.append(stage_row("manifest", manifest, "manifest", f"{gb(png_bytes)} PNG", png_bytes))
        download = step("download", dvc + ["repro", "-s", f"download@{DATASET}"])
        rows.append(stage_row("download@city", download, "download", f"{gb(png_bytes)} PNG", png_bytes))

        found = None
        if not failed:
            raw = project / "data/raw" / DATASET
            files = sorted(raw.glob("images/*.png")) + sorted(raw.glob("masks/*.png"))
            print(
                f"- ceiling: {len(files):,} PNGs decoded by Pillow in a Pool of {cores} processes, written to files",
                flush=True,
            )
            found = results["ceiling"] = ceiling(files, workdir / "scratch", cores)
            print(f"  {found['s']:.1f} s, {found['bytes'] / 1e6 / found['s']:,.0f} MB/s", flush=True)
            rows.append(
                note_row(
                    f"ceiling: Pillow x {cores} + write",
                    f"{gb(found['bytes'])} decoded",
                    f"{n / found['s']:,.1f} img/s",
                    seconds=found["s"],
                    mb_s=found["bytes"] / 1e6 / found["s"],
                )
            )

        prepare = step("prepare", dvc + ["repro", "-s", f"prepare@{DATASET}"])
        prepare_s = own_s(prepare, "prepare")
        prepared_bytes = tree_bytes(project / "data/prepared" / DATASET)[0] if prepare_s else 0
        results["prepared_bytes"] = prepared_bytes
        rows.append(
            stage_row(
                "prepare@city",
                prepare,
                "prepare",
                f"{gb(decoded[0])} decoded -> {gb(prepared_bytes)}",
                decoded[0],
                f"{n / prepare_s:,.1f} img/s" if prepare_s else "",
            )
        )
        if prepare_s and found:
            share = results["prepare_share_of_ceiling"] = found["s"] / prepare_s
            rows.append(
                note_row(
                    "prepare / ceiling",
                    f"DVC's hashing etc.: {prepare.wall_s - prepare_s:,.1f} s more",
                    f"{100 * share:.0f} %",
                    f">= {100 * CEILING_TARGET:.0f} %: {'ok' if share >= CEILING_TARGET else 'BELOW'}",
                )
            )

        train = step("train", dvc + ["repro", "-s", f"train@{DATASET}"])
        train_s = own_s(train, "train")
        rows.append(
            stage_row(
                "train@city",
                train,
                "train",
                f"{samples} patches of {patch}, val {counts['val']:,} images",
                None,
                f"{samples / train_s:,.1f} patches/s (all of it)" if train_s else "",
            )
        )
        if not failed:
            out = workdir / "probe.json"
            arguments = {
                "dataset": DATASET,
                "patch": patch,
                "batch": 8,
                "seed": 0,
                "arch": "vgg_unet",
                "width": args.width,
                "patches": 128,
                "steps": 8,
                "out": str(out),
            }
            probed = step(
                "loader probe", [python, "-m", "benchmarks.scale", "--probe", json.dumps(arguments)], required=False
            )
            if probed.rc == 0:
                probe_result = json.loads(out.read_text())
                loader, parts, model = (probe_result[k] for k in ("loader", "breakdown", "model"))
                results["probe"] = probe_result
                how = "1 worker" if loader["how"].startswith("train's") else "1 process, by hand"
                rows.append(
                    note_row(
                        f"  loader ({how})",
                        f"a patch: read {parts['read_ms']:.1f} ms + augment {parts['augment_ms']:.1f} ms",
                        f"{loader['patches_per_s']:,.1f} patches/s",
                        seconds=loader["s"],
                    )
                )
                rows.append(
                    note_row(
                        f"  model (vgg_unet w{args.width})",
                        f"batch {model['batch']}, {model['threads']} threads",
                        f"{model['steps_per_s']:,.2f} steps/s = {model['patches_per_s']:,.1f} patches/s",
                        "loader keeps up"
                        if loader["patches_per_s"] >= model["patches_per_s"]
                        else "the loader is slower",
                    )
                )
            else:
                rows.append(stage_row("  loader probe", probed, "probe", "", None))

        test_bytes = counts["test"] * pixels * 4
        evaluate = step("evaluate", dvc + ["repro", "-s", f"evaluate@{DATASET}"])
        evaluate_s = own_s(evaluate, "evaluate")
        rows.append(
            stage_row(
                "evaluate@city",
                evaluate,
                "evaluate",
                f"{counts['test']:,} test images, {gb(test_bytes)}",
                test_bytes,
                f"{counts['test'] / evaluate_s:,.2f} img/s" if evaluate_s else "",
            )
        )
        render = step("render", dvc + ["repro", "-s", f"render@{DATASET}"], required=False)
        rows.append(stage_row("render@city", render, "render", "grid 1, scale 1", None))

        test_ids = sorted(i for i, s in splits.items() if s == "test")[:8]
        inputs = [str(source / "images" / f"{i}.png") for i in test_ids]
        predict = step(
            "predict",
            [
                python,
                "-m",
                "pipeline.predict",
                DATASET,
                *inputs,
                "--out",
                str(workdir / "predictions"),
                "--tta",
                "none",
            ],
            required=False,
        )
        predict_s = own_s(predict, "predict")
        rows.append(
            stage_row(
                "predict",
                predict,
                "predict",
                f"{len(inputs)} test images, RGB",
                len(inputs) * pixels * 3,
                f"{len(inputs) / predict_s:,.2f} img/s" if predict_s else "",
            )
        )

        push = step("push", dvc + ["push"])
        rows.append(stage_row("dvc push (everything)", push, None, "", None))
        cache = project / ".dvc/cache"
        if not failed:
            before_cache, before_remote = cache_objects(cache), cache_objects(remote)
            extra = assign_splits(n, append, args.seed)
            write_split_file(source, {**splits, **extra})
            print(f"- appending {append} images", flush=True)
            with context.Pool(cores) as pool:
                generate(pool, source, args.seed, n, append, height, width)
            step("manifest (appended)", [python, "-m", "pipeline.manifest", "--dataset", DATASET])
            # render only if it ran before: a failing render would stop the re-run's push
            targets = [f"evaluate@{DATASET}"] + ([f"render@{DATASET}"] if render and render.rc == 0 else [])
            rerun = step("dvc repro (appended)", dvc + ["repro", *targets])
            if rerun is not None:
                ran = [k for k in ("download", "prepare", "train", "evaluate", "render") if k in rerun.stages]
                dvc_own = rerun.wall_s - sum(rerun.stages[k]["s"] or 0 for k in ran)
                rows.append(
                    stage_row(
                        f"dvc repro, +{append} images",
                        rerun,
                        None,
                        f"{len(ran)} stages; DVC's own time {dvc_own:,.1f} s",
                        None,
                    )
                )
                for name in ran:
                    rows.append({**stage_row(f"  {name}@city", rerun, name, "", None), "wall_s": None, "tree": None})
            push_again = step("push (appended)", dvc + ["push"])
            rows.append(stage_row("dvc push (appended)", push_again, None, "", None))
            if not failed:
                after_cache, after_remote = cache_objects(cache), cache_objects(remote)
                judged = append / n <= 1.5 * APPEND_SHARE
                for what, before, after in (
                    ("cache", before_cache, after_cache),
                    ("remote", before_remote, after_remote),
                ):
                    new = {k: v for k, v in after.items() if k not in before}
                    added, total = sum(new.values()), sum(after.values())
                    share = added / total if total else 0.0
                    results[f"append_{what}"] = {
                        "added_bytes": added,
                        "total_bytes": total,
                        "share": share,
                        "objects": len(new),
                        "by_output": added_by_output(project, new, cache),
                    }
                    verdict = (
                        ("ok" if share <= APPEND_TARGET else "OVER")
                        if judged
                        else f"n/a ({100 * append / n:.1f} % of the images)"
                    )
                    rows.append(
                        note_row(
                            f"+{append} images: {'added to the cache' if what == 'cache' else 'pushed'}",
                            f"{gb(added)} of {gb(total)}, {len(new):,} objects",
                            f"{100 * share:.2f} %",
                            f"<= {100 * APPEND_TARGET:.0f} %: {verdict}",
                        )
                    )
    finally:
        results.update(
            runs={name: vars(run) for name, run in runs.items()}, rows=rows, failed=failed, problems=problems
        )
        if rows:
            print()
            print(
                f"segpipe scale benchmark: {results.get('images', 0):,} images of {width}x{height} "
                f"({', '.join(f'{k} {v:,}' for k, v in results.get('splits', {}).items())}), then "
                f"+{results.get('append', 0)}; {info['cpu']} ({isa}), {cores} cores; "
                "stage s and peak MiB (PSS) are the "
                "stage's own processes, wall s and tree MiB the whole command with DVC"
            )
            print_table(rows)
            for line in results.get("append_cache", {}).get("by_output", []):
                print(f"  added to the cache: {line}")
            for name in ([failed] if failed else []) + problems:
                print(
                    f"{name} FAILED; its output: {runs[name].log}"
                    + (" (the steps after it did not run)" if name == failed else "")
                )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"figures: {args.out}")
        if args.keep:
            print(f"kept: {workdir}")
        elif temporary:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # a workdir of the user's: what this run made in it
            for path in (
                project,
                logs,
                workdir / "predictions",
                workdir / "scratch",
                workdir / "probe.json",
                remote,
                source,
                workdir / "source.json",
            ):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())

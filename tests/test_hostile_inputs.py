"""Files made to cost more than they hold, or to be misread: every decoder is bounded by what a file declares
before it allocates, and every refusal is one line that names the file and says why.

Memory is measured where it was the problem: the stage runs in a process of its own, whose peak resident size
the kernel reports when it is reaped (:func:`run_measured`); an address-space limit far above the cap keeps a
regression from taking the machine with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from pipeline import evaluate, images, predict, render, resume, train
from pipeline import prepare as prepare_stage
from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.datasets import folder
from pipeline.datasets.folder import ImageError
from pipeline.models import build_model
from pipeline.prepared import INDEX, DatasetMeta, PreparedDataError, Split, open_split, save_prepared
from pipeline.stage import main as run_stage
from tests.folder_data import png, write_binary_folder

REPO = Path(__file__).resolve().parents[1]
SMALL_CAP = 256 << 20  # peak resident size allowed to a process that imports no torch (~80 MiB) refusing a bomb
# ... to a stage that does, above its peak on good input (about 0.85 GiB here, most of it torch's libraries)
MARGIN = 256 << 20
ADDRESS_LIMIT = 6 << 30  # a regression fails with MemoryError instead of swapping out the test machine
UNSAFE_ADVICE = ("weights_only", "allow_pickle", "safe_globals", "allowlist", "trust")
MULTICLASS = DatasetMeta("toy", "multiclass", ["background", "a", "b"], [[0, 0, 0], [255, 0, 0], [0, 0, 255]])
BINARY = DatasetMeta("toy", "binary", ["background", "vessel"], [[0, 0, 0], [255, 255, 255]])


@pytest.fixture(autouse=True)
def repeatable_setup(monkeypatch, tmp_path):
    # runtime.setup runs once per stage process; torch refuses to set the inter-op thread count again.
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    monkeypatch.chdir(tmp_path)


# Runs the command as its only child and reports that child's peak: a process's peak resident size counts what
# it shared with the process it was forked from until it executed the command, here this small launcher's,
# where pytest's would swamp the figure.
LAUNCHER = """
import resource, subprocess, sys
limit, timeout, report = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
process = subprocess.Popen(sys.argv[4:], stdin=subprocess.DEVNULL)
try:
    status = process.wait(timeout)
except subprocess.TimeoutExpired:
    process.kill()
    status = process.wait()
with open(report, "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(status if status >= 0 else 128 - status)
"""


def run_measured(args: list[str], cwd: Path, timeout: float = 180) -> tuple[int, str, str, int]:
    """``(exit status, stdout, stderr, peak resident bytes)`` of ``args`` run in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        result = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(ADDRESS_LIMIT), str(timeout), str(report), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        return result.returncode, result.stdout, result.stderr, int(report.read_text())


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert not any(word in lines[0] for word in UNSAFE_ADVICE), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ crafted TIFFs


def tiff(width: int, height: int, blob: bytes, compression: int, tile: int | None = None) -> bytes:
    """A little-endian 8-bit gray TIFF, one strip or tiles of ``tile`` pixels a side, every one of which is
    ``blob``: a file of a few kilobytes can declare any size."""
    count = math.ceil(width / tile) * math.ceil(height / tile) if tile else 1
    offsets_at = 8 + len(blob)
    counts_at = offsets_at + 4 * count
    ifd_at = counts_at + 4 * count
    arrays = struct.pack(f"<{count}L", *[8] * count) + struct.pack(f"<{count}L", *[len(blob)] * count)
    where = (lambda at, value: value) if count == 1 else (lambda at, value: at)  # one value fits in its entry
    layout = (
        [
            (322, 4, 1, tile),
            (323, 4, 1, tile),
            (324, 4, count, where(offsets_at, 8)),
            (325, 4, count, where(counts_at, len(blob))),
        ]
        if tile
        else [(273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, len(blob))]
    )
    entries = sorted(
        [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, compression),
            (262, 3, 1, 1),
            (277, 3, 1, 1),
            *layout,
        ]
    )
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHLL", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<L", ifd_at) + blob + arrays + ifd


def zlib_of_zeros(size: int, chunk: int = 1 << 20) -> bytes:
    """A zlib stream of ``size`` zero bytes, made without compressing them: one fully flushed chunk, repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = (size % 65521) << 16 | 1  # of zeros: a stays 1, b counts the bytes
    return b"\x78\xda" + block * (size // chunk) + compressor.flush() + adler.to_bytes(4, "big")


def lzma_of_zeros(size: int, chunk: int = 16 << 20) -> bytes:
    """Concatenated xz streams, each of ``chunk`` zero bytes: what lzma.decompress inflates in one call."""
    return lzma.compress(bytes(chunk), preset=0) * (size // chunk)


HUGE_TIFF = (40000, 40000)  # 1.6 G pixels, 18 times the limit, in a 14 KB file of zlib tiles


def huge_tiff() -> bytes:
    return tiff(*HUGE_TIFF, zlib_of_zeros(1 << 20), compression=8, tile=1024)


def test_prepare_refuses_a_tiff_declaring_a_huge_size_before_decoding_it(tmp_path):
    raw = tmp_path / "data/raw/toy"
    raw.mkdir(parents=True)
    for i in range(4):
        (raw / f"{i}.tif").write_bytes(tiff(8, 8, zlib.compress(bytes(64)), compression=8))
        (raw / f"{i}_mask.png").write_bytes(png(np.zeros((8, 8), np.uint8)))
    (raw / "3.tif").write_bytes(huge_tiff())
    prepare = {
        "images": "{id}.tif",
        "masks": "{id}_mask.png",
        "split": {"method": "ids", "val_ids": ["1"], "test_ids": ["2"]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": {"toy": "folder"}, "toy": {"prepare": prepare}}))

    status, _, err, peak = run_measured([sys.executable, "-m", "pipeline.prepare", "toy"], tmp_path)
    assert status == 1 and one_line(err) == (
        "prepare toy: error: 3.tif: 40000 x 40000 pixels x 1 channel of 1 byte, more than an image may have "
        f"({images.MAX_PIXELS:,} pixels, {images.MAX_IMAGE_BYTES:,} bytes)"
    )
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"
    # Nothing written: prepare writes the dataset as it decodes it, into a temporary that it removes.
    assert not (tmp_path / "data/prepared/toy").exists() and not list((tmp_path / "data/prepared").iterdir())


def tiny_model(meta: DatasetMeta, channels: int = 1, outputs: int | None = None) -> Path:
    """An untrained SimpleUNet of width 2 at data/models/<name>/model.pt."""
    config = {
        "arch": "simple_unet",
        "in_channels": channels,
        "out_channels": meta.model_outputs if outputs is None else outputs,
        "width": 2,
    }
    torch.manual_seed(0)
    path = Path("data/models") / meta.name / "model.pt"
    save_checkpoint(path, config, build_model(config).state_dict(), meta)
    return path


def test_predict_refuses_huge_tiffs_devices_pipes_and_huge_files_with_one_line_each(tmp_path):
    tiny_model(MULTICLASS)
    Path("params.yaml").write_text(yaml.safe_dump({"toy": {"evaluate": {"batch_size": 4}}}))
    Path("good.png").write_bytes(png(np.zeros((12, 12), np.uint8)))
    Path("huge.tif").write_bytes(huge_tiff())
    os.mkfifo("pipe.png")
    with open("big.png", "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB that take no disk

    command = [sys.executable, "-m", "pipeline.predict", "toy", "--out", "out", "good.png"]
    status, _, err, baseline = run_measured(command, tmp_path)
    assert status == 0, err
    status, out, err, peak = run_measured([*command, "huge.tif", "/dev/zero", "pipe.png", "big.png"], tmp_path)
    assert status == 1, err
    assert err.splitlines() == [
        "predict toy: error: huge.tif: 40000 x 40000 pixels x 1 channel of 1 byte, more than an image may have "
        f"({images.MAX_PIXELS:,} pixels, {images.MAX_IMAGE_BYTES:,} bytes)",
        "predict toy: error: /dev/zero: not a regular file (a device, a pipe or a socket)",
        "predict toy: error: pipe.png: not a regular file (a device, a pipe or a socket)",
        f"predict toy: error: big.png: 3,221,225,472 bytes, more than an image file may have "
        f"({images.MAX_FILE_BYTES:,})",
    ]
    assert out.startswith("predict toy: 1 images in ") and out.endswith(", 4 failed\n")
    assert sorted(os.listdir("out")) == ["good.png", "good_overlay.jpg"]
    assert peak < baseline + MARGIN, f"peak RSS {peak / 2**20:.0f} MiB, {baseline / 2**20:.0f} MiB on good input"


# Each a 16 x 16 image whose one strip or tile decodes to far more than its 256 pixels would take.
BOMBS = {
    "zlib": (lambda: tiff(16, 16, zlib_of_zeros(1 << 30), compression=8), None),
    "lzma": (lambda: tiff(16, 16, lzma_of_zeros(1 << 30), compression=34925), None),
    "packbits": (lambda: tiff(16, 16, b"\x81\x00" * (2 << 20), compression=32773), None),  # 256 MiB
    "tile": (
        lambda: tiff(16, 16, zlib_of_zeros(1 << 30), compression=8, tile=32768),
        "one tile of 32768 x 32768 pixels x 1 channel of 1 byte, more than an image may have",
    ),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_a_tiff_segment_is_decoded_no_further_than_its_declared_size(kind, tmp_path):
    make, refusal = BOMBS[kind]
    Path("bomb.tif").write_bytes(make())
    code = (
        "import sys; from pathlib import Path; from pipeline.datasets.folder import read_image\n"
        "pixels = read_image(Path('bomb.tif'), 'bomb.tif', 1)\n"
        "print(pixels.shape, pixels.max())"
    )
    status, out, err, peak = run_measured([sys.executable, "-c", code], tmp_path)
    if refusal is None:
        assert status == 0 and out == "(16, 16, 1) 0\n", err
    else:
        assert status == 1 and f"ImageError: bomb.tif: {refusal}" in err
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"


def test_the_bounded_tiff_codecs_decode_what_tifffile_wrote():
    rgb16 = np.random.default_rng(0).integers(0, 65536, (37, 45, 3), dtype=np.uint16)
    for options in (
        {"compression": "zlib", "tile": (16, 16), "predictor": True},
        {"compression": "zlib", "rowsperstrip": 5},
        {"compression": "lzma", "rowsperstrip": 5},
    ):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, rgb16, **options)
        assert np.array_equal(folder.decode(buffer.getvalue(), "x.tif")[0], rgb16), options
    # PackBits, which tifffile writes only with imagecodecs: 3 bytes as they are, one byte 4 times, a no-op.
    packbits = tiff(7, 1, b"\x02\x0a\x14\x1e\xfd\x28\x80", compression=32773)
    assert folder.read_image(packbits, "p.tif", 1)[..., 0].tolist() == [[10, 20, 30, 40, 40, 40, 40]]


def test_files_are_opened_lazily_and_only_regular_ones(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match=r"^/dev/null: not a regular file \(a device, a pipe or a socket\)$"):
        folder.read_image(Path("/dev/null"), "/dev/null")
    with pytest.raises(ImageError, match=r"^missing\.png: cannot be read \(No such file or directory\)$"):
        folder.read_image(Path("missing.png"), "missing.png")
    Path("a.png").write_bytes(png(np.full((3, 5), 7, np.uint8)))
    assert folder.read_image(Path("a.png"), "a.png").shape == (3, 5, 3)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 10)
    with pytest.raises(ImageError, match=r"^a\.png: \d+ bytes, more than an image file may have \(10\)$"):
        folder.read_image(Path("a.png"), "a.png")


# ------------------------------------------------------------------------------------------ zip archives


def deflated_zeros(size: int, prefix: bytes = b"") -> tuple[bytes, int, int]:
    """``(raw deflate stream, size, crc32)`` of ``prefix`` then ``size`` zero bytes, for :func:`write_zip`."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc, chunk = zlib.crc32(prefix), bytes(1 << 20)
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return head + zlib_of_zeros(size)[2:-4], len(prefix) + size, crc


def write_zip(path: Path, members: list[tuple[str, bytes | tuple[bytes, int, int]]]) -> None:
    """A zip archive of members given as bytes (stored) or as :func:`deflated_zeros` (deflated), written by hand:
    zipfile would compress gigabytes where the test only needs to declare them."""
    with open(path, "wb") as f:
        directory = b""
        for name, data in members:
            if isinstance(data, bytes):
                method, body, size, crc = 0, data, len(data), zlib.crc32(data)
            else:
                method, (body, size, crc) = 8, data
            offset = f.tell()
            f.write(
                struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), size, len(name), 0)
                + name.encode()
                + body
            )
            directory += (
                struct.pack(
                    "<4s6H3L5H2L",
                    b"PK\x01\x02",
                    20,
                    20,
                    0,
                    method,
                    0,
                    0,
                    crc,
                    len(body),
                    size,
                    len(name),
                    0,
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + name.encode()
            )
        start = f.tell()
        f.write(
            directory
            + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), start, 0)
        )


def members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def with_deflated_junk(path: Path, size: int) -> None:
    """Add a ``junk`` tensor of ``size`` zero bytes, stored deflated, to the mapping torch saved at ``path``."""
    marker = 1_000_003  # elements of a float32 tensor: in the pickle, its numel and its size, nowhere else
    saved = torch.load(path, weights_only=True)
    saved["junk"] = torch.zeros(marker)
    torch.save(saved, path)
    numel = pickle.dumps(marker, protocol=2)[2:-1]  # the opcode and argument torch's pickle writes for it
    rewritten = []
    for name, data in members(path):
        if len(data) == 4 * marker:
            data = deflated_zeros(size)
        elif name.endswith("/data.pkl"):
            data = data.replace(numel, pickle.dumps(size // 4, protocol=2)[2:-1])
        rewritten.append((name, data))
    write_zip(path, rewritten)


def binary_project(
    fov: np.ndarray | None = None,
    channels: int = 1,
    n: int = 3,
    val: int = 0,
    reference: bool = False,
    test_fov: np.ndarray | None = None,
    meta: DatasetMeta = BINARY,
) -> Path:
    """Prepared data of 16 x 16 images (a binary task unless ``meta`` says otherwise; ``fov`` for every image,
    or ``test_fov`` one per test image), an untrained model for it and params.yaml, in the current directory."""
    rng = np.random.default_rng(0)

    def split(count: int, fovs: np.ndarray | None = None) -> Split:
        masks = (rng.random((count, 16, 16)) < 0.3).astype(np.uint8)
        if fovs is None and fov is not None:
            fovs = np.repeat(fov[None], count, 0)
        return Split(
            rng.integers(0, 256, (count, 16, 16, channels), dtype=np.uint8),
            masks,
            np.array([f"i{i}" for i in range(count)]),
            fovs,
            (rng.random((count, 16, 16)) < 0.3).astype(np.uint8) if reference else None,
        )

    save_prepared("data/prepared/toy", meta, {"train": split(n), "val": split(val), "test": split(n, test_fov)})
    section = {
        "arch": "simple_unet",
        "width": 2,
        "epochs": 1,
        "batch_size": 2,
        "lr": 0.01,
        "loss": "bce" if meta.task == "binary" else "cross_entropy",
    }
    Path("params.yaml").write_text(
        yaml.safe_dump({"toy": {"evaluate": {"batch_size": 4}, "render": {"scale": 1}, "train": section}})
    )
    return tiny_model(meta, channels)


def test_a_checkpoint_with_a_compressed_tensor_is_refused_before_it_is_inflated(tmp_path):
    model = binary_project()
    status, _, err, baseline = run_measured([sys.executable, "-m", "pipeline.evaluate", "toy"], tmp_path)
    assert status == 0, err
    with_deflated_junk(model, 1 << 30)
    assert model.stat().st_size < 2 << 20
    status, _, err, peak = run_measured([sys.executable, "-m", "pipeline.evaluate", "toy"], tmp_path)
    line = one_line(err)
    assert status == 1 and line.startswith("evaluate toy: error: data/models/toy/model.pt: member model/data/")
    assert line.endswith(" is compressed; this file holds uncompressed members only")
    assert peak < baseline + MARGIN, f"peak RSS {peak / 2**20:.0f} MiB, {baseline / 2**20:.0f} MiB on good input"


def test_a_resume_state_with_a_compressed_member_is_discarded_not_resumed(tmp_path, capsys):
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": 3, "width": 2})
    training = resume.Training(
        model, torch.optim.Adam(model.parameters()), None, np.random.default_rng(0), torch.device("cpu")
    )
    key = resume.ResumeKey(params={"epochs": 2}, data="digest", runtime={"device": "cpu"})
    path = tmp_path / "state.pt"
    resume.save_state(path, key, training, [{"train_loss": 1.0, "lr": 0.01}])
    assert resume.read_state(path, key, "toy.train", training, 2) is not None  # a good state resumes
    with_deflated_junk(path, 4 << 20)

    assert resume.read_state(path, key, "toy.train", training, 2) is None
    line = one_line(capsys.readouterr().out)
    assert line.startswith(f"discarding {path}: it is not a readable training state (") and "is compressed" in line
    assert not path.exists()


def test_a_torch_file_with_unexpected_members_is_refused(tmp_path):
    model = binary_project()
    good = members(model)
    write_zip(model, good + [("model/junk.txt", b"a member torch never writes")])
    with pytest.raises(CheckpointError, match=r"^data/models/toy/model\.pt: unexpected member model/junk\.txt"):
        load_checkpoint(model)
    write_zip(
        model, [("other/" + name.split("/", 1)[1] if name.endswith("version") else name, data) for name, data in good]
    )
    with pytest.raises(CheckpointError, match=r"^data/models/toy/model\.pt: unexpected member other/"):
        load_checkpoint(model)
    write_zip(model, good)
    load_checkpoint(model)  # the same members, written by this test's zip writer: accepted


# ------------------------------------------------------------------------------------------ prepared shards
# A prepared dataset is index.json, which says where each sample's arrays lie, and tar shards read with one
# positioned read per array (pipeline/prepared.py). Nothing in it is decompressed or unpickled: what a reader
# allocates is what the index declares, and the index is checked against the shards (their sizes, sha256s and
# the bounds of every block) before any array is read. tests/test_prepared_format.py checks the format itself;
# these are the files a hostile user crafts, through the stages that read them.

PREPARED = Path("data/prepared/toy")


def read_index() -> dict:
    return json.loads((PREPARED / INDEX).read_text())


def write_index(index: dict) -> None:
    (PREPARED / INDEX).write_text(json.dumps(index))


def first_shard(split: str) -> Path:
    return PREPARED / read_index()["splits"][split][0]["file"]


def rehash(split: str, change) -> Path:
    """Change the bytes of ``split``'s first shard with ``change(data, block)`` (its first block's index entry)
    and record the shard's new size and sha256 in the index, as someone who knows the format would: the
    shard then passes every check made on opening it."""
    index = read_index()
    shard = index["splits"][split][0]
    path = PREPARED / shard["file"]
    data = bytearray(path.read_bytes())
    change(data, shard["blocks"][0])
    path.write_bytes(data)
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_index(index)
    return path


def truncated(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return (
        f"{path}: {len(data) // 2:,} bytes, the index records {len(data):,}: truncated or replaced; run the "
        "prepare stage again"
    )


def flipped(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)
    return f"{path}: its sha256 differs from the index's: the shard was changed; run the prepare stage again"


def removed(path: Path) -> str:
    path.unlink()
    return f"{path}: cannot be read (No such file or directory); run the prepare stage again"


def piped(path: Path) -> str:
    """A named pipe in the shard's place: refused from its size, never opened (a read would wait for ever)."""
    size = path.stat().st_size
    path.unlink()
    os.mkfifo(path)
    return f"{path}: 0 bytes, the index records {size:,}: truncated or replaced; run the prepare stage again"


# Each stage, and the split it reads whose shard is damaged (evaluate reads both of a binary task's).
STAGES = {
    "evaluate": (evaluate.evaluate_stage, "test"),
    "evaluate-train": (evaluate.evaluate_stage, "train"),
    "render": (render.render, "test"),
    "train": (train.train, "train"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", [truncated, flipped, removed, piped], ids=lambda f: f.__name__)
@pytest.mark.parametrize("stage", STAGES)
def test_a_damaged_shard_is_refused_by_each_stage_with_one_line_naming_it(tmp_path, capsys, stage, damage):
    binary_project()
    function, split = STAGES[stage]
    model = Path("data/models/toy/model.pt").read_bytes()
    message = damage(first_shard(split))
    assert run_stage(function, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == f"{stage.split('-')[0]} toy: error: {message}"
    # Nothing published: the model as it was, no metrics.
    assert Path("data/models/toy/model.pt").read_bytes() == model and not Path("metrics/toy").exists()


@pytest.mark.parametrize(
    "role, value, problem",
    [
        ("mask", 2, "a mask holds class 2; the dataset has 2 classes"),
        ("mask", 255, "a mask holds class 255; the dataset has 2 classes"),
        ("fov", 2, "a field of view holds values other than 0 and 1"),
        ("reference", 9, "a reference holds class 9; the dataset has 2 classes"),
    ],
)
def test_a_rehashed_shard_holding_values_out_of_range_is_refused_when_read(tmp_path, capsys, role, value, problem):
    """The sha256 cannot tell a shard tampered with by someone who rehashed it: its values are checked as read."""
    binary_project(fov=np.ones((16, 16), bool), reference=True)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 0  # for render, which draws what evaluate scored
    capsys.readouterr()

    def change(data: bytearray, block: dict) -> None:
        data[block[role] + 17] = value  # the 18th pixel of the block's first sample

    path = rehash("test", change)
    with pytest.raises(PreparedDataError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        list(open_split(PREPARED, "test"))
    for function, name in ((evaluate.evaluate_stage, "evaluate"), (render.render, "render")):
        if role == "reference" and name == "render":
            continue  # render draws no reference
        assert run_stage(function, ["toy"]) == 1
        assert one_line(capsys.readouterr().err) == f"{name} toy: error: {path}: {problem}"
    assert not Path("metrics/toy/render").exists()


def test_a_rehashed_validation_shard_is_refused_by_train_with_one_line(tmp_path, capsys):
    binary_project(fov=np.ones((16, 16), bool), val=2)
    path = rehash("val", lambda data, block: data.__setitem__(block["mask"], 7))
    assert Path("data/models/toy/model.pt").is_file()  # an earlier training's
    assert run_stage(train.train, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"train toy: error: {path}: a mask holds class 7; the dataset has 2 classes"
    )
    # Refused at the first validation: the earlier model went with its curves when the run started replacing
    # them, and the run wrote no curve row: nothing DVC could take for a finished training.
    assert not Path("data/models/toy/model.pt").exists()
    assert not list(Path("metrics/toy").rglob("*.tsv"))
    assert "runtime" not in json.loads(Path("metrics/toy/train/metrics.json").read_text())  # dvclive's, not the end's


def test_a_rehashed_training_shard_is_refused_by_train_with_one_line(tmp_path, capsys):
    binary_project()
    path = rehash("train", lambda data, block: data.__setitem__(block["mask"], 7))
    assert run_stage(train.train, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"train toy: error: {path}: a mask holds class 7; the dataset has 2 classes"
    )


def test_an_index_declaring_a_huge_image_is_refused_before_anything_is_allocated(tmp_path):
    """An index of a few bytes may declare any size: [65536, 65536] is 4 GiB an image, within the sides an
    image may have. The blocks it declares must lie within the shard, which bounds any read by the file."""
    binary_project()
    command = [sys.executable, "-m", "pipeline.evaluate", "toy"]
    status, _, err, baseline = run_measured(command, tmp_path)
    assert status == 0, err
    index = read_index()
    shard = index["splits"]["test"][0]
    shard["blocks"][0]["size"] = [65536, 65536]
    write_index(index)
    message = (
        f"{PREPARED / INDEX}: shard {shard['file']}: the image block of i0 lies outside the shard; the index "
        "is damaged: run the prepare stage again"
    )
    status, _, err, peak = run_measured(command, tmp_path)
    assert status == 1 and one_line(err) == f"evaluate toy: error: {message}"
    assert peak < baseline + MARGIN, f"peak RSS {peak / 2**20:.0f} MiB, {baseline / 2**20:.0f} MiB on good input"
    code = "from pipeline.prepared import open_split; list(open_split('data/prepared/toy', 'test'))"
    status, _, err, peak = run_measured([sys.executable, "-c", code], tmp_path)
    assert status == 1 and f"PreparedDataError: {message}" in err
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"


def set_block(key, value):
    def change(index: dict) -> None:
        index["splits"]["test"][0]["blocks"][0][key] = value

    return change


def set_shard(key, value):
    def change(index: dict) -> None:
        index["splits"]["test"][0][key] = value

    return change


def set_top(key, value):
    def change(index: dict) -> None:
        index[key] = value

    return change


def overlapping(index: dict) -> None:  # the masks read from the images' bytes
    block = index["splits"]["test"][0]["blocks"][0]
    block["mask"] = block["image"]


def duplicated(index: dict) -> None:
    block = index["splits"]["test"][0]["blocks"][0]
    block["ids"][1] = block["ids"][0]


SHARD = r"shard test-[0-9a-f]{16}\.tar: "
SIZE = r"a block's size must be \[height, width\]"
# How the index is damaged, and what the refusal says after "data/prepared/toy/index.json: ".
JUNK_INDEXES = {
    "size-beyond-sides": (set_block("size", [65537, 1]), SHARD + SIZE + ", sides 1-65536"),
    "size-zero-height": (set_block("size", [0, 16]), SHARD + SIZE + ", sides 1-65536"),
    "size-of-strings": (set_block("size", ["16", "16"]), SHARD + SIZE),
    "size-of-booleans": (set_block("size", [True, True]), SHARD + SIZE),
    "offset-negative": (set_block("image", -512), SHARD + "the image block of i0 lies outside the shard"),
    "offset-float": (set_block("mask", 1024.0), SHARD + "the mask block of i0 lies outside the shard"),
    "offset-string": (set_block("image", "0"), SHARD + "the image block of i0 lies outside the shard"),
    "offset-beyond": (set_block("mask", 1 << 62), SHARD + "the mask block of i0 lies outside the shard"),
    "overlap": (overlapping, SHARD + "two blocks overlap"),
    "no-masks": (
        lambda index: index["splits"]["test"][0]["blocks"][0].pop("mask") and None,
        SHARD + "a block without images",
    ),
    "ids-not-names": (set_block("ids", ["../../etc/passwd", "b", "c"]), SHARD + "a block's ids must be a non-empty"),
    "ids-not-a-list": (set_block("ids", "i0"), SHARD + "a block's ids must be a non-empty list"),
    "id-twice": (duplicated, "an id appears twice in split test"),
    "fingerprints-missing": (set_block("fingerprints", []), SHARD + "one fingerprint per id needed"),
    "bytes-string": (set_shard("bytes", "3072"), SHARD + "bytes or sha256 missing"),
    "sha256-not-hex": (set_shard("sha256", "z" * 64), SHARD + "bytes or sha256 missing"),
    "blocks-empty": (set_shard("blocks", []), SHARD + "no blocks"),
    "shard-outside": (
        set_shard("file", "../../../train-0123456789abcdef.tar"),
        "a shard of split test has no valid, unique file name",
    ),
    "shard-absolute": (set_shard("file", "/dev/zero"), "a shard of split test has no valid, unique file name"),
    "channels-string": (set_top("channels", "1"), "channels '1'"),
    "channels-huge": (set_top("channels", 1 << 40), "channels 1099511627776"),
    "splits-a-list": (set_top("splits", ["train", "val", "test"]), r"splits must be \['train', 'val', 'test'\]"),
    "other-format": (set_top("format", "segpipe-shards/2"), "not a segpipe-shards/1 index"),
    "not-a-mapping": (lambda index: [index], "not a segpipe-shards/1 index"),
}


@pytest.mark.parametrize("damage", JUNK_INDEXES)
def test_an_index_with_junk_or_wrong_types_is_refused_with_one_line_naming_it(tmp_path, capsys, damage):
    binary_project()
    change, problem = JUNK_INDEXES[damage]
    index = read_index()
    write_index(change(index) or index)  # each changes the index in place, or returns another
    message = rf"data/prepared/toy/index\.json: {problem}.*; the index is damaged: run the prepare stage again"
    with pytest.raises(PreparedDataError, match=f"^{message}$"):
        open_split(PREPARED, "test")
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert re.fullmatch(f"evaluate toy: error: {message}", one_line(capsys.readouterr().err))


@pytest.mark.parametrize(
    "text",
    [b"[1, 2", b"\xff\xfe\x00junk", b'{"format": "segpipe-shards/1", "channels": 1,}'],
    ids=["cut", "not-utf8", "bad-json"],
)
def test_an_index_that_is_not_json_is_refused_with_one_line_naming_it(tmp_path, capsys, text):
    binary_project()
    (PREPARED / INDEX).write_bytes(text)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err).startswith(
        "evaluate toy: error: data/prepared/toy/index.json: not a readable index ("
    )


def test_an_index_of_junk_says_why_it_is_not_json(tmp_path, capsys):
    binary_project()
    (PREPARED / INDEX).write_bytes(b"junk")
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "evaluate toy: error: data/prepared/toy/index.json: not a readable index (Expecting value: line 1 column 1 "
        "(char 0))"
    )


def test_a_huge_index_is_refused_before_it_is_read(tmp_path):
    binary_project()
    with open(PREPARED / INDEX, "r+b") as f:
        f.truncate(320 << 20)  # sparse: no disk
    code = "from pipeline.prepared import open_split; open_split('data/prepared/toy', 'test')"
    status, _, err, peak = run_measured([sys.executable, "-c", code], tmp_path)
    assert status == 1 and "PreparedDataError: data/prepared/toy/index.json: " in err
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------ refusals


class NotAWeight:  # a pickled instance: what a weights-only load must refuse, never run
    pass


@pytest.mark.parametrize(
    "payload, reason",
    [
        (NotAWeight(), f"Unsupported global: GLOBAL {__name__}.NotAWeight was not an allowed global by default."),
        (os.system, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."),
    ],
    ids=["class", "blocked"],
)
def test_a_refused_checkpoint_says_why_without_unsafe_advice(tmp_path, capsys, payload, reason):
    model = binary_project()
    torch.save({"model": payload}, model)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"evaluate toy: error: data/models/toy/model.pt: not a model checkpoint written by train ({reason})"
    )


def test_a_refused_resume_state_says_why_without_unsafe_advice(tmp_path, capsys):
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": 3, "width": 2})
    training = resume.Training(
        model, torch.optim.Adam(model.parameters()), None, np.random.default_rng(0), torch.device("cpu")
    )
    key = resume.ResumeKey(params={"epochs": 2}, data="digest", runtime={"device": "cpu"})
    path = tmp_path / "state.pt"
    torch.save({"format": NotAWeight()}, path)
    assert resume.read_state(path, key, "toy.train", training, 2) is None
    assert one_line(capsys.readouterr().out) == (
        f"discarding {path}: it is not a readable training state (UnpicklingError: Unsupported global: GLOBAL "
        f"{__name__}.NotAWeight was not an allowed global by default.); training from epoch 1"
    )


# ------------------------------------------------------------------------------------------ channels, splits


@pytest.mark.parametrize("stage", [evaluate.evaluate_stage, render.render], ids=["evaluate", "render"])
def test_a_model_for_other_input_channels_is_refused_before_it_runs(tmp_path, capsys, stage):
    binary_project(channels=1)
    tiny_model(BINARY, channels=3)  # trained on RGB; the data has since been prepared in gray
    assert run_stage(stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err).endswith(
        "error: data/models/toy/model.pt: the model reads 3-channel images, but data/prepared/toy/test holds "
        "1-channel images; rerun train"
    )


def test_a_checkpoint_whose_head_does_not_fit_its_classes_is_refused(tmp_path, capsys):
    binary_project()
    tiny_model(BINARY, outputs=3)  # 3 outputs for a binary task's single logit
    message = (
        "data/models/toy/model.pt: the network has 3 output channels, but its binary task with classes "
        "['background', 'vessel'] needs 1 (one logit for a binary task, one per class for a multiclass one)"
    )
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load_checkpoint("data/models/toy/model.pt")
    Path("in.png").write_bytes(png(np.zeros((12, 12), np.uint8)))
    assert predict.main(["toy", "in.png", "--out", "out"]) == 1
    assert one_line(capsys.readouterr().err) == f"predict toy: error: {message}"
    assert not Path("out").exists()


def gray_split(n: int) -> Split:
    return Split(np.zeros((n, 8, 8, 1), np.uint8), np.zeros((n, 8, 8), np.uint8), np.array([f"i{i}" for i in range(n)]))


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_train_or_test_split_is_refused_and_an_empty_val_split_allowed(tmp_path, capsys, split):
    binary_project()
    assert len(open_split(PREPARED, "val")) == 0 and read_index()["splits"]["val"] == []
    # The writer refuses to write one, and leaves nothing behind ...
    with pytest.raises(
        PreparedDataError,
        match=rf"^data/prepared/x/{split}: holds no images; the {split} split "
        r"needs at least one$",
    ):
        save_prepared(
            "data/prepared/x",
            BINARY,
            {"train": gray_split(2), "val": gray_split(0), "test": gray_split(2), split: gray_split(0)},
        )
    assert not Path("data/prepared/x").exists()
    # ... and an index that lists no shard for it (its shards left in place) is refused on opening.
    index = read_index()
    index["splits"][split] = []
    write_index(index)
    message = f"data/prepared/toy/{split}: holds no images; the {split} split needs at least one"
    with pytest.raises(PreparedDataError, match=f"^{message}$"):
        open_split(PREPARED, split)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == f"evaluate toy: error: {message}"
    if split == "train":
        assert run_stage(train.train, ["toy"]) == 1
        assert one_line(capsys.readouterr().err) == f"train toy: error: {message}"


NO_VALID_PIXEL = "no pixel of its {n} images is valid (its fov is all false); nothing to train on or score"


def unscored(split: str) -> None:
    """Make the index say that no pixel of ``split`` counts, as a split of all-false fovs is written."""
    index = json.loads((PREPARED / INDEX).read_text())
    for shard in index["splits"][split]:
        for block in shard["blocks"]:
            block["scored"] = False
    (PREPARED / INDEX).write_text(json.dumps(index))


def test_a_split_without_a_valid_pixel_is_refused_when_written_and_when_opened(tmp_path, capsys):
    """Nothing to train on or score: the writer refuses such a split, and every stage refuses an index that
    says it holds one, with one line naming the split."""
    with pytest.raises(PreparedDataError, match=rf"data/prepared/toy/train: {re.escape(NO_VALID_PIXEL.format(n=3))}"):
        binary_project(fov=np.zeros((16, 16), bool))
    assert not PREPARED.exists()

    binary_project(fov=np.ones((16, 16), bool))
    unscored("test")
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"evaluate toy: error: data/prepared/toy/test: {NO_VALID_PIXEL.format(n=3)}"
    )
    assert not Path("metrics/toy").exists()

    # One test image without a valid pixel among others: scored as the others, never a traceback.
    test_fov = np.zeros((3, 16, 16), bool)
    test_fov[[0, 2]] = True
    binary_project(fov=np.ones((16, 16), bool), test_fov=test_fov)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("meta", [BINARY, MULTICLASS], ids=["binary", "multiclass"])
def test_train_refuses_a_training_split_without_a_valid_pixel(tmp_path, capsys, meta):
    binary_project(fov=np.ones((16, 16), bool), meta=meta)
    unscored("train")
    assert run_stage(train.train, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"train toy: error: data/prepared/toy/train: {NO_VALID_PIXEL.format(n=3)}"
    )


def test_validity_masks_that_are_all_black_are_refused_before_anything_is_scored(tmp_path, capsys):
    raw = write_binary_folder(tmp_path / "data/raw/leaves", n=6)
    for gif in (raw / "valid").iterdir():
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(gif, format="GIF")
    section = {
        "images": "images/{id}.jpg",
        "masks": "masks/{id}_mask.png",
        "valid": "valid/{id}.gif",
        "split": {"method": "ratio", "val": 0.2, "test": 0.2, "seed": 0},
    }
    Path("params.yaml").write_text(
        yaml.safe_dump(
            {"datasets": {"leaves": "folder"}, "leaves": {"prepare": section, "evaluate": {"batch_size": 4}}}
        )
    )
    assert run_stage(prepare_stage.prepare, ["leaves"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"prepare leaves: error: data/prepared/leaves/train: {NO_VALID_PIXEL.format(n=4)}"
    )
    assert not Path("data/prepared/leaves").exists() and not Path("metrics/leaves").exists()

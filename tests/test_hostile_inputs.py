"""Files made to cost more than they hold, or to be misread: every decoder is bounded by what a file declares
before it allocates, and every refusal is one line that names the file and says why.

Memory is measured where it was the problem: the stage runs in a process of its own, whose peak resident size
the kernel reports when it is reaped (:func:`run_measured`); an address-space limit far above the cap keeps a
regression from taking the machine with it.
"""

from __future__ import annotations

import io
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

from pipeline import evaluate, predict, render, resume
from pipeline import prepare as prepare_stage
from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.datasets import folder
from pipeline.datasets.folder import ImageError
from pipeline.models import build_model
from pipeline.prepared import DatasetMeta, PreparedDataError, Split, load_split, save_prepared
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
        result = subprocess.run([sys.executable, "-c", LAUNCHER, str(ADDRESS_LIMIT), str(timeout), str(report), *args],
                                cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout + 60)
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
    layout = ([(322, 4, 1, tile), (323, 4, 1, tile), (324, 4, count, where(offsets_at, 8)),
               (325, 4, count, where(counts_at, len(blob)))] if tile else
              [(273, 4, 1, 8), (278, 4, 1, height), (279, 4, 1, len(blob))])
    entries = sorted([(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, compression),
                      (262, 3, 1, 1), (277, 3, 1, 1), *layout])
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
    prepare = {"images": "{id}.tif", "masks": "{id}_mask.png",
               "split": {"method": "ids", "val_ids": ["1"], "test_ids": ["2"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": {"toy": "folder"}, "toy": {"prepare": prepare}}))

    status, _, err, peak = run_measured([sys.executable, "-m", "pipeline.prepare", "toy"], tmp_path)
    assert status == 1 and one_line(err) == (
        "prepare toy: error: 3.tif: 40000 x 40000 pixels x 1 channel of 1 byte, more than an image may have "
        f"({folder.MAX_PIXELS:,} pixels, {folder.MAX_IMAGE_BYTES:,} bytes)")
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"
    assert not (tmp_path / "data/prepared").exists()


def tiny_model(meta: DatasetMeta, channels: int = 1, outputs: int | None = None) -> Path:
    """An untrained SimpleUNet of width 2 at data/models/<name>/model.pt."""
    config = {"arch": "simple_unet", "in_channels": channels,
              "out_channels": meta.model_outputs if outputs is None else outputs, "width": 2}
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
        f"({folder.MAX_PIXELS:,} pixels, {folder.MAX_IMAGE_BYTES:,} bytes)",
        "predict toy: error: /dev/zero: not a regular file (a device, a pipe or a socket)",
        "predict toy: error: pipe.png: not a regular file (a device, a pipe or a socket)",
        f"predict toy: error: big.png: 3,221,225,472 bytes, more than an image file may have "
        f"({folder.MAX_FILE_BYTES:,})",
    ]
    assert out.startswith("predict toy: 1 images in ") and out.endswith(", 4 failed\n")
    assert sorted(os.listdir("out")) == ["good.png", "good_overlay.jpg"]
    assert peak < baseline + MARGIN, f"peak RSS {peak / 2**20:.0f} MiB, {baseline / 2**20:.0f} MiB on good input"


# Each a 16 x 16 image whose one strip or tile decodes to far more than its 256 pixels would take.
BOMBS = {
    "zlib": (lambda: tiff(16, 16, zlib_of_zeros(1 << 30), compression=8), None),
    "lzma": (lambda: tiff(16, 16, lzma_of_zeros(1 << 30), compression=34925), None),
    "packbits": (lambda: tiff(16, 16, b"\x81\x00" * (2 << 20), compression=32773), None),  # 256 MiB
    "tile": (lambda: tiff(16, 16, zlib_of_zeros(1 << 30), compression=8, tile=32768),
             "one tile of 32768 x 32768 pixels x 1 channel of 1 byte, more than an image may have"),
}


@pytest.mark.parametrize("kind", BOMBS)
def test_a_tiff_segment_is_decoded_no_further_than_its_declared_size(kind, tmp_path):
    make, refusal = BOMBS[kind]
    Path("bomb.tif").write_bytes(make())
    code = ("import sys; from pathlib import Path; from pipeline.datasets.folder import read_image\n"
            "pixels = read_image(Path('bomb.tif'), 'bomb.tif', 1)\n"
            "print(pixels.shape, pixels.max())")
    status, out, err, peak = run_measured([sys.executable, "-c", code], tmp_path)
    if refusal is None:
        assert status == 0 and out == "(16, 16, 1) 0\n", err
    else:
        assert status == 1 and f"ImageError: bomb.tif: {refusal}" in err
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"


def test_the_bounded_tiff_codecs_decode_what_tifffile_wrote():
    rgb16 = np.random.default_rng(0).integers(0, 65536, (37, 45, 3), dtype=np.uint16)
    for options in ({"compression": "zlib", "tile": (16, 16), "predictor": True},
                    {"compression": "zlib", "rowsperstrip": 5}, {"compression": "lzma", "rowsperstrip": 5}):
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
    monkeypatch.setattr(folder, "MAX_FILE_BYTES", 10)
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
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), size, len(name), 0)
                    + name.encode() + body)
            directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(body), size,
                                     len(name), 0, 0, 0, 0, 0, offset) + name.encode()
        start = f.tell()
        f.write(directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory),
                                        start, 0))


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


def binary_project(fov: np.ndarray | None = None, channels: int = 1, n: int = 3) -> Path:
    """Prepared binary data of 16 x 16 images, an untrained model for it and params.yaml, in the current directory."""
    rng = np.random.default_rng(0)

    def split(count: int) -> Split:
        masks = (rng.random((count, 16, 16)) < 0.3).astype(np.uint8)
        return Split(rng.integers(0, 256, (count, 16, 16, channels), dtype=np.uint8), masks,
                     np.array([f"i{i}" for i in range(count)]), None if fov is None else np.repeat(fov[None], count, 0))

    save_prepared("data/prepared/toy", BINARY, {"train": split(n), "val": split(0), "test": split(n)})
    Path("params.yaml").write_text(yaml.safe_dump({"toy": {"evaluate": {"batch_size": 4}, "render": {"scale": 1}}}))
    return tiny_model(BINARY, channels)


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
    training = resume.Training(model, torch.optim.Adam(model.parameters()), None, np.random.default_rng(0),
                               torch.device("cpu"))
    key = resume.ResumeKey(params={"epochs": 2}, data="digest", runtime={"device": "cpu"})
    path = tmp_path / "state.pt"
    resume.save_state(path, key, training, [{"train_loss": 1.0, "lr": 0.01}])
    assert resume.read_state(path, key, "toy.train", training, 2) is not None  # a good state resumes
    with_deflated_junk(path, 4 << 20)

    assert resume.read_state(path, key, "toy.train", training, 2) is None
    line = one_line(capsys.readouterr().out)
    assert line.startswith(f"discarding {path}: it is not a readable training state (") and "is compressed" in line
    assert not path.exists()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def good_arrays(n: int = 2) -> dict[str, np.ndarray]:
    return {"images": np.zeros((n, 8, 8, 1), np.uint8), "masks": np.zeros((n, 8, 8), np.uint8),
            "ids": np.array([f"i{i}" for i in range(n)])}


def test_an_npz_with_a_compressed_member_is_refused_before_it_is_inflated(tmp_path):
    binary_project()
    size = 1 << 30
    write_zip(Path("data/prepared/toy/test.npz"), [
        ("images.npy", deflated_zeros(size, npy_header((size // 256, 16, 16, 1)))),
        ("masks.npy", npy(np.zeros((1, 16, 16), np.uint8))), ("ids.npy", npy(np.array(["a"])))])
    code = "from pipeline.prepared import load_split; load_split('data/prepared/toy', 'test')"
    status, _, err, peak = run_measured([sys.executable, "-c", code], tmp_path)
    assert status == 1 and ("PreparedDataError: data/prepared/toy/test.npz: member images.npy is compressed; "
                            "this file holds uncompressed members only") in err
    assert peak < SMALL_CAP, f"peak RSS {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("member, data, message", [
    # 730 GiB claimed by a header of a few bytes
    ("images.npy", npy_header((730, 1 << 10, 1 << 10, 1 << 10)),
     r"member images\.npy declares 783,831,531,520 bytes of uint8 \(730, 1024, 1024, 1024\) but holds 0"),
    ("images.npy", npy_header((2, 8, 8, 1)) + bytes(100),
     r"member images\.npy declares 128 bytes of uint8 \(2, 8, 8, 1\) but holds 100"),
    ("ids.npy", npy(np.array(["a", "b"], dtype=object)),
     r"member ids\.npy holds Python objects \(dtype object\); the prepared format holds plain arrays only"),
    ("junk.npy", npy(np.zeros(3)), r"unexpected member junk\.npy"),
    ("images.npy", b"not an npy file at all", r"member images\.npy is not a numpy array \("),
])
def test_an_npz_member_is_checked_against_its_header_before_it_is_read(tmp_path, member, data, message):
    binary_project()
    arrays = {f"{k}.npy": npy(v) for k, v in good_arrays().items()}
    write_zip(Path("data/prepared/toy/test.npz"), list({**arrays, member: data}.items()))
    with pytest.raises(PreparedDataError, match=rf"^data/prepared/toy/test\.npz: {message}"):
        load_split("data/prepared/toy", "test")
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1


def test_a_torch_file_with_unexpected_members_is_refused(tmp_path):
    model = binary_project()
    good = members(model)
    write_zip(model, good + [("model/junk.txt", b"a member torch never writes")])
    with pytest.raises(CheckpointError, match=r"^data/models/toy/model\.pt: unexpected member model/junk\.txt"):
        load_checkpoint(model)
    write_zip(model, [("other/" + name.split("/", 1)[1] if name.endswith("version") else name, data)
                      for name, data in good])
    with pytest.raises(CheckpointError, match=r"^data/models/toy/model\.pt: unexpected member other/"):
        load_checkpoint(model)
    write_zip(model, good)
    load_checkpoint(model)  # the same members, written by this test's zip writer: accepted


# ------------------------------------------------------------------------------------------ refusals


class NotAWeight:  # a pickled instance: what a weights-only load must refuse, never run
    pass


@pytest.mark.parametrize("payload, reason", [
    (NotAWeight(), f"Unsupported global: GLOBAL {__name__}.NotAWeight was not an allowed global by default."),
    (os.system, "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."),
], ids=["class", "blocked"])
def test_a_refused_checkpoint_says_why_without_unsafe_advice(tmp_path, capsys, payload, reason):
    model = binary_project()
    torch.save({"model": payload}, model)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"evaluate toy: error: data/models/toy/model.pt: not a model checkpoint written by train ({reason})")


def test_a_refused_resume_state_says_why_without_unsafe_advice(tmp_path, capsys):
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": 3, "width": 2})
    training = resume.Training(model, torch.optim.Adam(model.parameters()), None, np.random.default_rng(0),
                               torch.device("cpu"))
    key = resume.ResumeKey(params={"epochs": 2}, data="digest", runtime={"device": "cpu"})
    path = tmp_path / "state.pt"
    torch.save({"format": NotAWeight()}, path)
    assert resume.read_state(path, key, "toy.train", training, 2) is None
    assert one_line(capsys.readouterr().out) == (
        f"discarding {path}: it is not a readable training state (UnpicklingError: Unsupported global: GLOBAL "
        f"{__name__}.NotAWeight was not an allowed global by default.); training from epoch 1")


def test_a_refused_npz_says_why_without_unsafe_advice(tmp_path, capsys):
    binary_project()
    np.savez("data/prepared/toy/test.npz", **{**good_arrays(), "ids": np.array(["a", "b"], dtype=object)})
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "evaluate toy: error: data/prepared/toy/test.npz: member ids.npy holds Python objects (dtype object); "
        "the prepared format holds plain arrays only")


# ------------------------------------------------------------------------------------------ channels, splits


@pytest.mark.parametrize("stage", [evaluate.evaluate_stage, render.render], ids=["evaluate", "render"])
def test_a_model_for_other_input_channels_is_refused_before_it_runs(tmp_path, capsys, stage):
    binary_project(channels=1)
    tiny_model(BINARY, channels=3)  # trained on RGB; the data has since been prepared in gray
    assert run_stage(stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err).endswith(
        "error: data/models/toy/model.pt: the model reads 3-channel images, but data/prepared/toy/test.npz holds "
        "1-channel images; rerun train")


def test_a_checkpoint_whose_head_does_not_fit_its_classes_is_refused(tmp_path, capsys):
    binary_project()
    tiny_model(BINARY, outputs=3)  # 3 outputs for a binary task's single logit
    message = ("data/models/toy/model.pt: the network has 3 output channels, but its binary task with classes "
               "['background', 'vessel'] needs 1 (one logit for a binary task, one per class for a multiclass one)")
    with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
        load_checkpoint("data/models/toy/model.pt")
    Path("in.png").write_bytes(png(np.zeros((12, 12), np.uint8)))
    assert predict.main(["toy", "in.png", "--out", "out"]) == 1
    assert one_line(capsys.readouterr().err) == f"predict toy: error: {message}"
    assert not Path("out").exists()


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_train_or_test_split_is_refused_and_an_empty_val_split_allowed(tmp_path, capsys, split):
    binary_project()
    assert len(load_split("data/prepared/toy", "val")) == 0
    empty = {k: v[:0] for k, v in good_arrays().items()}
    np.savez(f"data/prepared/toy/{split}.npz", **empty)
    message = f"data/prepared/toy/{split}.npz: holds no images; the {split} split needs at least one"
    with pytest.raises(PreparedDataError, match=f"^{message}$"):
        load_split("data/prepared/toy", split)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == f"evaluate toy: error: {message}"
    with pytest.raises(PreparedDataError, match=r"^data/prepared/x/test: holds no images; the test split needs"):
        save_prepared("data/prepared/x", BINARY, {"train": Split(**good_arrays()), "val": Split(**empty),
                                                  "test": Split(**empty)})


def test_a_split_without_a_valid_pixel_is_refused_when_written_and_when_loaded(tmp_path, capsys):
    black = np.zeros((16, 16), bool)
    with pytest.raises(PreparedDataError, match=r"^data/prepared/toy/train: no pixel of its 3 images is valid "
                                                r"\(its fov is all false\); nothing to train on or score$"):
        binary_project(fov=black)
    fov = np.ones((16, 16), bool)
    binary_project(fov=fov)
    with np.load("data/prepared/toy/train.npz") as npz:
        arrays = dict(npz)
    np.savez("data/prepared/toy/train.npz", **{**arrays, "fov": np.zeros_like(arrays["fov"])})
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "evaluate toy: error: data/prepared/toy/train.npz: no pixel of its 3 images is valid (its fov is all false); "
        "nothing to train on or score")

    # One test image without a valid pixel among others: scored as the others, never a traceback.
    np.savez("data/prepared/toy/train.npz", **arrays)
    arrays["fov"][1] = False
    np.savez("data/prepared/toy/test.npz", **arrays)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 0, capsys.readouterr().err


def test_prepare_refuses_validity_masks_that_are_all_black(tmp_path, capsys):
    raw = write_binary_folder(tmp_path / "data/raw/leaves", n=6)
    for gif in (raw / "valid").iterdir():
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(gif, format="GIF")
    section = {"images": "images/{id}.jpg", "masks": "masks/{id}_mask.png", "valid": "valid/{id}.gif",
               "split": {"method": "ratio", "val": 0.2, "test": 0.2, "seed": 0}}
    Path("params.yaml").write_text(yaml.safe_dump({"datasets": {"leaves": "folder"}, "leaves": {"prepare": section}}))
    assert run_stage(prepare_stage.prepare, ["leaves"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "prepare leaves: error: data/prepared/leaves/train: no pixel of its 4 images is valid (its fov is all false); "
        "nothing to train on or score")
    assert not Path("data/prepared/leaves").exists()

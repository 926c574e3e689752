"""Outputs are written whole or not at all, and a write that the machine refuses is the user's error, in one line."""

from __future__ import annotations

import errno
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import atomic, stage
from pipeline.atomic import OutputError, atomic_path, write_json

REPO = Path(__file__).resolve().parents[1]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "metrics" / "eval.json"
    with pytest.raises(OutputError, match=rf"^{out}: cannot write the output \(No space left on device\)$"):
        with atomic_path(out) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() reports it: no file name
    assert leftovers(out.parent) == []


def test_the_previous_output_survives_a_failed_write(tmp_path):
    out = tmp_path / "eval.json"
    write_json(out, {"dice": 0.5})
    with pytest.raises(OutputError):
        with atomic_path(out) as tmp:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp))
    assert out.read_text() == '{\n  "dice": 0.5\n}\n'
    assert leftovers(tmp_path) == ["eval.json"]


def test_an_unreadable_input_keeps_its_own_error(tmp_path):
    """Only errors about the output become OutputError; one about another file is not the output's fault."""
    missing = tmp_path / "input.npz"
    with pytest.raises(FileNotFoundError) as raised:
        with atomic_path(tmp_path / "out.json"):
            missing.read_bytes()
    assert not isinstance(raised.value, OutputError)
    assert leftovers(tmp_path) == []


def test_a_file_where_the_output_directory_should_be(tmp_path):
    (tmp_path / "metrics").write_text("not a directory")
    with pytest.raises(
        OutputError, match=r"metrics/mnist/eval.json: cannot write the output: .*/metrics is a file, not a directory$"
    ):
        write_json(tmp_path / "metrics" / "mnist" / "eval.json", {})


def test_a_failed_rename_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    def refuse(source, destination):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), str(destination))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OutputError, match="Invalid cross-device link"):
        write_json(tmp_path / "eval.json", {})
    assert leftovers(tmp_path) == []


def test_a_directory_whose_replacement_fails_is_put_back(tmp_path, monkeypatch):
    out = tmp_path / "many"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a.png").write_bytes(b"old")

    def refuse(source, destination):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), str(destination))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OutputError, match=rf"^{out}: cannot write the output \(Invalid cross-device link\)$"):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "b.png").write_bytes(b"new")
    assert leftovers(tmp_path) == ["many"] and leftovers(out) == ["a.png"]


def test_the_stage_runner_prints_it_as_one_line(tmp_path, capsys):
    (tmp_path / "metrics").write_text("not a directory")

    def a_stage(dataset: str) -> str:
        write_json(tmp_path / "metrics" / dataset / "eval.json", {})
        return "written"

    a_stage.__module__ = "pipeline.evaluate"  # named after a real stage, whose docstring the runner reads
    importlib.import_module(a_stage.__module__)
    assert stage.main(a_stage, ["mnist"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"evaluate mnist: error: {tmp_path}/metrics/mnist/eval.json: cannot write the output: "
        f"{tmp_path}/metrics is a file, not a directory\n"
    )


# ------------------------------------------------------------------------------------------ killed while replacing

KILLED_REPLACE = textwrap.dedent("""
    \"\"\"Replace a directory output with the write killed (SIGKILL) before the k-th file operation, for every k;
    print the output's state after each kill, and after the cleanup that the next write starts with.\"\"\"
    import json, os, shutil, signal, sys
    from pathlib import Path
    from pipeline import atomic

    root = Path(sys.argv[1])
    out = root / "data" / "raw" / "many"
    OLD = {f"{i:03}.png": b"old" for i in range(30)}
    NEW = {f"{i:03}.png": b"new" for i in range(20)}

    def state():
        if not os.path.lexists(out):
            return "none"
        files = {p.name: p.read_bytes() for p in out.iterdir()}
        return "old" if files == OLD else "new" if files == NEW else f"a mix of {len(files)} files"

    def write(files):
        with atomic.atomic_path(out) as tmp:
            tmp.mkdir()
            for name, data in files.items():
                (tmp / name).write_bytes(data)

    def kill_before_operation(k):
        calls = [0]
        def killing(operation):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                return operation(*args, **kwargs)
            return wrapped
        for name in ("unlink", "remove", "rmdir", "rename", "replace"):
            setattr(os, name, killing(getattr(os, name)))

    for k in range(1, 1000):
        shutil.rmtree(root / "data", ignore_errors=True)
        write(OLD)
        pid = os.fork()
        if pid == 0:
            kill_before_operation(k)
            write(NEW)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        after_kill = state()
        atomic.remove_stale_temporaries(out)
        print(json.dumps({"k": k, "killed": killed, "after_kill": after_kill, "after_cleanup": state(),
                          "left": sorted(p.name for p in out.parent.iterdir())}))
        if not killed:
            break
""")


def test_a_directory_replaced_by_a_killed_writer_is_the_old_or_the_new_never_a_mix(tmp_path):
    """A kill before each file operation of a directory's replacement, one at a time: the output is always the
    old directory or the new one (or, between the two renames, nothing, until the next write puts the old back)."""
    result = subprocess.run(
        [sys.executable, "-c", KILLED_REPLACE, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()]
    assert runs[-1]["killed"] is False and runs[-1]["after_kill"] == "new"  # every operation was a kill point
    assert [run for run in runs if run["after_kill"] not in ("old", "new", "none")] == []
    assert [run for run in runs if run["after_cleanup"] not in ("old", "new") or run["left"] != ["many"]] == []
    # Killed between moving the old aside and moving the new in: the next write puts the old back first.
    assert {(run["after_kill"], run["after_cleanup"]) for run in runs} == {
        ("old", "old"),
        ("none", "old"),
        ("new", "new"),
    }


# ------------------------------------------------------------------------------------------ torch on a full disk

FULL_DISK_TORCH = textwrap.dedent("""
    \"\"\"The train stage's two torch.save calls, the checkpoint's and the resume state's, under a file size
    limit.\"\"\"
    import resource, signal, sys
    from pathlib import Path
    import numpy as np, torch
    from pipeline import checkpoint, resume, train as train_stage  # the runner reads its docstring
    from pipeline.prepared import DatasetMeta
    from pipeline.stage import main

    root = Path(sys.argv[1])
    model = torch.nn.Linear(64, 64)  # 16 KiB of weights

    def save_model(dataset):
        meta = DatasetMeta(name=dataset, task="binary", classes=["bg", "fg"], colors=[[0, 0, 0], [255, 255, 255]])
        checkpoint.save_checkpoint(root / "model.pt", {"arch": "unet", "in_channels": 1, "out_channels": 1,
                                                       "width": 4}, model.state_dict(), meta)
        return "saved"

    def save_state(dataset):
        training = resume.Training(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                   np.random.default_rng(0), torch.device("cpu"))
        resume.save_state(root / "state.pt", resume.ResumeKey({"lr": 0.1}, "0" * 64, {}), training, [])
        return "saved"

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    for stage in (save_model, save_state):
        stage.__module__ = "pipeline.train"
        print("exit", main(stage, ["toy"]))
""")


def test_a_torch_save_that_cannot_write_is_one_line_and_leaves_nothing(tmp_path):
    """A real failed write: past the file size limit (RLIMIT_FSIZE) write() fails with EFBIG, as with ENOSPC on
    a full disk. torch.save to a path reports it as a RuntimeError ("unexpected pos"), not an OSError."""
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_TORCH, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "exit 1\nexit 1\n"
    assert result.stderr == (
        f"train toy: error: {tmp_path}/model.pt: cannot write the output (File too large)\n"
        f"train toy: error: {tmp_path}/state.pt: cannot write the output (File too large)\n"
    )
    assert leftovers(tmp_path) == []


def test_write_torch_saves_what_torch_save_saves(tmp_path):
    """The bytes of torch.save to a file object: the same records as to a path, under the folder "archive/"
    rather than the file's stem, which torch.load does not read."""
    import io

    import torch

    state = {"w": torch.arange(10_000, dtype=torch.float32), "meta": {"a": [1, 2]}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic.write_torch(tmp_path / "model.pt", state)
    assert (tmp_path / "model.pt").read_bytes() == buffer.getvalue()
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == state["meta"]
    assert leftovers(tmp_path) == ["model.pt"]

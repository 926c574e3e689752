"""Outputs are written whole or not at all, and a write that the machine refuses is the user's error, in one line."""

from __future__ import annotations

import errno
import importlib
import os

import pytest

from pipeline import atomic, stage
from pipeline.atomic import OutputError, atomic_path, write_json


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
    with pytest.raises(OutputError, match=r"metrics/mnist/eval.json: cannot write the output: .*/metrics is a file, not a directory$"):
        write_json(tmp_path / "metrics" / "mnist" / "eval.json", {})


def test_a_failed_rename_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    def refuse(source, destination):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), str(destination))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OutputError, match="Invalid cross-device link"):
        write_json(tmp_path / "eval.json", {})
    assert leftovers(tmp_path) == []


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
    assert err == (f"evaluate mnist: error: {tmp_path}/metrics/mnist/eval.json: cannot write the output: "
                   f"{tmp_path}/metrics is a file, not a directory\n")

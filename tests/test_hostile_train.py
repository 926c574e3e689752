"""Train under a hostile user (issue 17): a failing augmenting worker, two trainings of one dataset at once, a
tampered resume state, a training that diverges. Each ends with one line and exit status 1, at once, with
nothing published."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import engine, resume, train
from pipeline.augment import AugmentParams, build_augmentation
from pipeline.loader import AugmentedBatches, WorkerFailed, augmenting_loader
from pipeline.prepared import INDEX, Split, load_meta, load_split, save_prepared
from pipeline.stage import main as run_stage
from tests.test_models_train import prepared_split
from tests.test_resume import MODEL, STATE, make_training, toy, train_command, write_section  # noqa: F401 (toy: a fixture)

CURVES = Path("metrics/toy/train")
TIMEOUT_S = 60  # each run here takes a few seconds; beyond this it is hung


def published(root: Path) -> list[str]:
    """What of a finished training is there: the model, or the curves' summary that ends a run (live curves
    before it are the run's progress, not a result)."""
    summary = root / CURVES / "metrics.json"
    finished = summary.exists() and "runtime" in json.loads(summary.read_text())
    return [str(MODEL)] * (root / MODEL).exists() + [str(summary)] * finished


# ------------------------------------------------------------------------------------------ a failing worker

# The stage as `python -m pipeline.train toy` runs it, with the augmentation raising in the loader's worker
# process from batch FAIL_BATCH of epoch FAIL_EPOCH on (0-based), as a sample the transform rejects makes it.
FAILING_WORKER = """
import sys
from pipeline import loader, stage, train

original = loader.AugmentedBatches.__getitem__

def rejecting(self, i):
    if (self.epoch, i) >= ({epoch}, {batch}):
        raise ValueError(f"the transform rejects batch {{i}}")
    return original(self, i)

loader.AugmentedBatches.__getitem__ = rejecting
sys.exit(stage.main(train.train, ["toy"]))
"""


def test_a_failing_augmenting_worker_ends_the_training_at_once(toy):
    command = train_command(toy)
    command["args"] = [sys.executable, "-c", FAILING_WORKER.format(epoch=1, batch=2)]  # after some steps
    start = time.monotonic()
    result = subprocess.run(**command, capture_output=True, timeout=TIMEOUT_S)  # hung for ever before
    assert time.monotonic() - start < 30
    assert result.returncode == 1, result.stderr
    assert "ValueError: the transform rejects batch 2" in result.stderr  # the worker's own error, above
    ids = load_split(toy / "data/prepared/toy", "train").ids
    rng = np.random.default_rng(0)  # the sample order of epoch 2, as the training draws it
    order = [rng.permutation(32) for _ in range(2)][-1]
    names = ", ".join(repr(str(ids[i])) for i in order[16:19])
    assert result.stderr.splitlines()[-1] == (
        f"train toy: error: data/prepared/toy: augmenting batch 3/4 of epoch 2/2 (training samples {names}, ...) "
        f"failed in the loader's worker process (its error is above)"
    )
    assert not published(toy)
    assert torch.load(toy / STATE, weights_only=True)["epochs_done"] == 1  # kept, to resume


@pytest.mark.parametrize("where", ["worker", "training"])
def test_the_loader_ends_its_worker_on_an_error_on_either_side(monkeypatch, tmp_path, where):
    """Its worker ignores SIGTERM: one left alive after an error would hold up the interpreter's exit."""
    rng = np.random.default_rng(0)
    images, masks = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), np.zeros((12, 8, 8), np.uint8)
    augment = build_augmentation(AugmentParams(flips=True), None, 0, 0)
    split = prepared_split(tmp_path / "prepared", images, masks)
    batches = AugmentedBatches(split, np.arange(12), 4, augment, seed=0, epoch=0)
    original = AugmentedBatches.__getitem__
    monkeypatch.setattr(
        AugmentedBatches,
        "__getitem__",
        lambda self, i: original(self, i) if i < 1 or where != "worker" else 1 / 0,
    )
    with pytest.raises(WorkerFailed if where == "worker" else KeyError) as failed:
        with augmenting_loader(batches, torch.device("cpu")) as loader:
            for step, _ in enumerate(loader):
                assert multiprocessing.active_children()
                if where == "training" and step == 1:
                    raise KeyError("a training step failed")
    assert not multiprocessing.active_children()  # while the traceback, and the iterator with it, live on
    if where == "worker":
        assert failed.value.step == 1


@pytest.mark.parametrize("size", [[0, 28], [28, 0]], ids=["zero-height", "zero-width"])
def test_training_images_of_an_empty_side_are_refused_before_training(toy, capsys, size):
    """The writer refuses an image with an empty side; an index tampered to declare one is refused on opening,
    before a worker pads or crops nothing."""
    path = toy / "data/prepared/toy" / INDEX
    index = json.loads(path.read_text())
    for shard in index["splits"]["train"]:
        for block in shard["blocks"]:
            block["size"] = size
    path.write_text(json.dumps(index))
    assert run_stage(train.train, ["toy"]) == 1
    captured = capsys.readouterr()
    assert re.fullmatch(
        r"train toy: error: data/prepared/toy/index\.json: shard train-[0-9a-f]{16}\.tar: a block's "
        r"size must be \[height, width\], sides 1-65536; the index is damaged: run the prepare stage "
        r"again\n",
        captured.err,
    ), captured.err
    assert captured.out == "" and not published(toy)


# ------------------------------------------------------------------------------------------ one training at once


def test_a_second_training_of_the_same_dataset_is_refused_while_the_first_runs(toy):
    first = subprocess.Popen(**train_command(toy), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stdout.readline().startswith("train toy: simple_unet")  # the first has started training
        first.send_signal(signal.SIGSTOP)  # and stays in its first epoch while the second starts
        second = subprocess.run(**train_command(toy), capture_output=True, timeout=TIMEOUT_S)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=TIMEOUT_S)
    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stderr == (
        f"train toy: error: .segpipe/resume/toy.lock: another training of toy is running (pid "
        f"{first.pid}); wait for it to end, or stop it\n"
    )
    assert second.stdout == ""  # refused before it read anything
    assert first.returncode == 0, err
    assert "resuming" not in out and "epoch 2/2:" in out
    steps = (toy / CURVES / "plots/metrics/train_loss.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in steps] == ["0", "1"]  # every epoch, once
    with resume.training_lock("toy"):  # released when the first ended
        pass


@pytest.mark.parametrize("processes", [1, 2])
def test_the_lock_is_held_for_the_whole_run_and_released_after(toy, capsys, processes):
    write_section(toy, epochs=2, processes=processes)
    with resume.training_lock("toy"):
        # With several processes the launcher holds it (its ranks do not take it again): refused before any starts.
        assert run_stage(train.train, ["toy"]) == 1
        assert capsys.readouterr().err == (
            f"train toy: error: .segpipe/resume/toy.lock: another training of toy is "
            f"running (pid {os.getpid()}); wait for it to end, or stop it\n"
        )
    if processes == 1:  # released: it trains (two processes are trained in tests/test_distributed.py)
        assert run_stage(train.train, ["toy"]) == 0
        assert not (toy / ".segpipe/resume/toy").exists()
    with resume.training_lock("toy"):  # and released by the run that held it
        pass


def test_under_a_torchrun_of_ones_own_rank_0_holds_the_lock(toy, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    with resume.training_lock("toy"):
        assert run_stage(train.train, ["toy"]) == 1
    assert "another training of toy is running" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a tampered state

ROW = {"train_loss": 1.0, "val_loss": 1.0, "val_dice": 0.5, "lr": 0.001}


@pytest.mark.parametrize(
    "rows, problem",
    [
        (
            [ROW, {**ROW, "../../../../tmp/ESCAPED": 1.0}],
            "its curve row 2 has unknown names ['../../../../tmp/ESCAPED']",
        ),
        ([ROW, {**ROW, "val_loss": None}], "its curve row 2 has val_loss None"),
        ([ROW, {**ROW, "lr": math.nan}], "its curve row 2 has lr nan"),
        ([ROW, {**ROW, "lr": True}], "its curve row 2 has lr True"),
        ([ROW, {"train_loss": 1.0, "lr": 0.001}], "its curve row 2 has the curves ['lr', 'train_loss'], row 1 "),
        ([ROW, "train_loss"], "its curve row 2 is not a row of named numbers"),
    ],
    ids=["escaping-name", "none", "nan", "bool", "other-names", "not-a-row"],
)
def test_a_state_with_tampered_curves_is_discarded(tmp_path, capsys, rows, problem):
    path = tmp_path / "state.pt"
    key = resume.ResumeKey({"lr": 0.01}, "0" * 64, {"device": "cpu"})
    resume.save_state(path, key, make_training(), rows)
    assert resume.load_state(path, key, "toy.train", make_training(), epochs=3) == []
    assert not path.exists()
    out = capsys.readouterr().out
    assert out.startswith(f"discarding {path}: {problem}") and out.endswith("; training from epoch 1\n"), out


def test_a_tampered_curve_name_writes_nothing_outside_and_trains_from_epoch_1(toy, capsys, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    state = state_after_one_epoch(toy)
    # dvclive writes a curve <name> to .segpipe/resume/toy/curves/plots/metrics/<name>.tsv
    name = os.path.relpath(outside / "ESCAPED", toy / STATE.parent / "curves/plots/metrics")
    state["curves"] = [{**state["curves"][0], name: 1.0}]
    torch.save(state, STATE)
    assert run_stage(train.train, ["toy"]) == 0
    out = capsys.readouterr().out
    assert f"discarding {STATE}: its curve row 1 has unknown names [{name!r}]" in out and "resuming" not in out
    assert "epoch 1/2:" in out and not list(outside.iterdir())


def state_after_one_epoch(root: Path) -> dict:
    """The state a run of 2 epochs leaves when stopped after its first (SIGTERM once epoch 1 is reported)."""
    process = subprocess.Popen(**train_command(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith("epoch 1/2:"):
            process.send_signal(signal.SIGTERM)
            break
    process.communicate(timeout=TIMEOUT_S)
    return torch.load(root / STATE, weights_only=True)


# ------------------------------------------------------------------------------------------ divergence


def test_a_diverging_training_stops_with_one_line_and_publishes_nothing(toy):
    write_section(toy, epochs=2, lr=1e20, schedule="constant")  # NaN in the first epoch on this data
    result = subprocess.run(**train_command(toy), capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == (
        "train toy: error: toy.train.lr: the training diverged: its train loss is nan in epoch "
        "1/2; lower the learning rate (it is 1e+20)\n"
    )
    assert not published(toy) and not (toy / STATE).exists()


def test_a_loss_that_goes_non_finite_later_keeps_the_last_finite_state(toy, capsys, monkeypatch):
    original = engine.Trainer.train_one_epoch

    def diverging_in_epoch_2(trainer, loader, batches, epoch, progress):
        loss = original(trainer, loader, batches, epoch, progress)
        return math.inf if "epoch 2/" in progress else loss

    monkeypatch.setattr(engine.Trainer, "train_one_epoch", diverging_in_epoch_2)
    assert run_stage(train.train, ["toy"]) == 1
    captured = capsys.readouterr()
    assert captured.err == (
        "train toy: error: toy.train.lr: the training diverged: its train loss is inf in epoch "
        "2/2; lower the learning rate (it is 0.01)\n"
    )
    assert "epoch 1/2:" in captured.out and "epoch 2/2:" not in captured.out
    assert not published(toy)
    assert torch.load(STATE, weights_only=True)["epochs_done"] == 1  # the last finite epoch's


def test_non_finite_weights_after_the_last_step_are_not_saved(toy, capsys, monkeypatch):
    prepared = toy / "data/prepared/toy"
    splits = {name: load_split(prepared, name) for name in ("train", "val", "test")}
    val = splits["val"]  # no validation split: nothing but the weights can show it
    splits["val"] = Split(images=val.images[:0], masks=val.masks[:0], ids=val.ids[:0])
    save_prepared(prepared, load_meta(prepared), splits)
    original = engine.Trainer.train_one_epoch

    def blowing_up_after_the_last_step(trainer, loader, batches, epoch, progress):
        loss = original(trainer, loader, batches, epoch, progress)
        if "epoch 2/" in progress:
            with torch.no_grad():
                next(trainer.model.parameters())[0] = math.nan
        return loss

    monkeypatch.setattr(engine.Trainer, "train_one_epoch", blowing_up_after_the_last_step)
    assert run_stage(train.train, ["toy"]) == 1
    assert capsys.readouterr().err == (
        "train toy: error: toy.train.lr: the training diverged: its weights are not "
        "finite after epoch 2/2; lower the learning rate (it is 0.01)\n"
    )
    assert not published(toy)

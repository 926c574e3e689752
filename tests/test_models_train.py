"""The two U-Nets, and the training stage's core: loss masking, augmentation, determinism, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from pipeline import train, train_params
from pipeline.augment import AffineParams, AugmentParams, build_augmentation
from pipeline.checkpoint import load_checkpoint
from pipeline.datasets import mnist
from pipeline.loader import AugmentedBatches, augmenting_loader
from pipeline.losses import IGNORE, LOSSES
from pipeline.models import SimpleUNet, VGGUNet, build_model, count_parameters
from pipeline.prepared import (
    SPLITS,
    DatasetMeta,
    PreparedSplit,
    PreparedWriter,
    Sample,
    Split,
    load_meta,
    load_split,
    open_split,
    sample_fingerprint,
    save_prepared,
)
from pipeline.stage import main as run_stage


def test_simple_unet_is_the_tutorials():
    model = SimpleUNet(1, 11, width=64)
    # Counted by hand from the tutorial's layers (see the class docstring): 640 + 36,992 + 221,696 + 885,760
    # + 590,336 + 147,712 + 715.
    assert count_parameters(model) == 1_883_851
    assert model.enc1[0].bias is not None and all(
        m.bias is None
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m not in (model.enc1[0], model.head)
    )
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 11, 28, 28)


def test_vgg_unet_levels_and_any_input_size():
    model = VGGUNet(3, 1, width=64)
    widths = [model.inc[-2].num_features] + [block[-2].num_features for block in model.down]
    assert widths == [64, 128, 256, 512, 512]
    assert [block[-2].num_features for block in model.up] == [256, 128, 64, 64]
    small = VGGUNet(3, 1, width=4).eval()
    assert small(torch.zeros(1, 3, 37, 45)).shape == (1, 1, 37, 45)  # odd sizes: padded to the skips


def test_build_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="unknown model architecture 'resnet'"):
        build_model({"arch": "resnet", "in_channels": 1, "out_channels": 2, "width": 8})


def test_ignored_pixels_do_not_change_the_loss():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 8, 8), dtype=torch.uint8)
    target[:, :3] = IGNORE
    cases = [(name, task, 3 if task == "multiclass" else 1) for name, tasks in LOSSES.items() for task in tasks]
    assert len(cases) == 5  # every loss of every task
    for name, task, channels in cases:
        loss = LOSSES[name][task]
        logits = torch.randn(2, channels, 8, 8)
        changed = logits.clone()
        changed[:, :, :3] = 100.0  # only where the target is ignored
        assert loss(logits, target) == pytest.approx(loss(changed, target).item()), (name, task)
        changed[:, :, 5] = -100.0  # and somewhere that counts
        assert loss(logits, target) != pytest.approx(loss(changed, target).item()), (name, task)
        # The sums add up over parts of a batch: the loss of two halves' summed sums is the whole batch's.
        halves = loss.sums(logits[:1], target[:1]) + loss.sums(logits[1:], target[1:])
        assert loss.from_sums(halves).item() == pytest.approx(loss(logits, target).item(), rel=1e-6), (name, task)


def warp_mismatches(interpolation: str) -> int:
    """Pixels where a warped MNIST-like mask no longer equals the threshold rule applied to the warped image."""
    rng = np.random.default_rng(0)
    image = (rng.random((28, 28, 1)) ** 3 * 255).astype(np.uint8)
    mask = mnist.threshold_masks(image[None, ..., 0], np.array([6]), 0.2)[0]
    augment = build_augmentation(AugmentParams(affine=AffineParams(interpolation=interpolation)), None, 0, 0)
    mismatches = 0
    for _ in range(20):
        out = augment(image=image, mask=mask)
        expected = mnist.threshold_masks(out["image"][None, ..., 0], np.array([6]), 0.2)[0]
        mismatches += int((expected != out["mask"]).sum())
    return mismatches


def test_nearest_warps_keep_the_threshold_rule_and_linear_ones_break_it():
    assert warp_mismatches("nearest") == 0
    assert warp_mismatches("linear") > 0


def roughness(image: np.ndarray) -> float:
    return float(np.abs(np.diff(image.astype(int), axis=1)).mean())


@pytest.mark.parametrize(
    ("setting", "changed"),
    [
        ({"colour_balance": 0.2}, lambda image, out: np.ptp(out.mean((0, 1)) / image.mean((0, 1))) > 0.01),
        ({"blur": 2.0}, lambda image, out: roughness(out) < 0.9 * roughness(image)),
        ({"jpeg_quality": 20}, lambda image, out: 0 < np.abs(out.astype(int) - image).mean() < 50),
    ],
    ids=["colour_balance", "blur", "jpeg_quality"],
)
def test_camera_shift_augmentations_change_the_image_and_never_the_mask(setting, changed):
    """Half of the samples: each as a new camera would change it (per-channel gains, blur, JPEG artefacts)."""
    rng = np.random.default_rng(0)
    image = rng.integers(40, 216, (32, 32, 3), dtype=np.uint8)
    mask = (rng.random((32, 32)) < 0.3).astype(np.uint8)
    augment = build_augmentation(AugmentParams(**setting), None, 0, 0)
    outs = [augment(image=image, mask=mask) for _ in range(40)]
    assert all(np.array_equal(out["mask"], mask) for out in outs)
    touched = [not np.array_equal(out["image"], image) for out in outs]
    assert 8 <= sum(touched) <= 32  # p = 0.5
    assert all(changed(image, out["image"]) for out, t in zip(outs, touched) if t)


def test_foreground_patches_always_hold_foreground_and_uniform_ones_mostly_do_not():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)
    mask = np.full((90, 100), IGNORE, np.uint8)  # outside a field of view
    mask[10:80, 10:90] = 0
    mask[40:43, 50:53] = 1  # one small foreground blob: 9 of 9,000 pixels
    mask[0, 0] = 2  # ... and a class-2 pixel in the corner, outside the field of view's box (still foreground)
    found = {}
    for sampling in ("uniform", "foreground"):
        augment = build_augmentation(AugmentParams(), 16, 0, IGNORE, sampling)
        crops = [augment(image=image, mask=mask) for _ in range(200)]
        assert all(c["image"].shape == (16, 16, 3) and c["mask"].shape == (16, 16) for c in crops)
        found[sampling] = sum(bool(((c["mask"] > 0) & (c["mask"] != IGNORE)).any()) for c in crops)
    assert found["foreground"] == 200 and found["uniform"] < 40
    # An image smaller than the patch is padded, as the uniform crop pads it, with IGNORE in the mask.
    small = build_augmentation(AugmentParams(), 128, 0, IGNORE, "foreground")(image=image, mask=mask)
    assert (
        small["image"].shape == (128, 128, 3)
        and (small["mask"] == IGNORE).sum() == 128 * 128 - 90 * 100 + (mask == IGNORE).sum()
    )


@pytest.fixture
def tiny_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)
        return Split(images=images, masks=(images[..., 0] > 128).astype(np.uint8), ids=np.arange(n).astype(str))

    meta = DatasetMeta(name="toy", task="binary", classes=["background", "thing"], colors=[[0, 0, 0], [255, 0, 0]])
    save_prepared(tmp_path / "data/prepared/toy", meta, {"train": split(24), "val": split(8), "test": split(8)})
    section = {
        "arch": "simple_unet",
        "width": 4,
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.01,
        "loss": "bce_dice",
        "augment": {"flips": True, "affine": {"p": 0.5}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": section}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_training_is_deterministic(tiny_dataset):
    train.train("toy")
    first, _ = load_checkpoint(tiny_dataset / "data/models/toy/model.pt")
    history = (tiny_dataset / "metrics/toy/train/metrics.json").read_text()
    train.train("toy")
    second, meta = load_checkpoint(tiny_dataset / "data/models/toy/model.pt")
    assert meta.task == "binary" and second.head.out_channels == 1  # one logit for a binary task
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tiny_dataset / "metrics/toy/train/metrics.json").read_text() == history


def test_an_empty_validation_split_trains_on_without_a_validation_curve(tiny_dataset, capsys):
    prepared = tiny_dataset / "data/prepared/toy"
    splits = {name: load_split(prepared, name) for name in ("train", "val", "test")}
    val = splits["val"]
    splits["val"] = Split(images=val.images[:0], masks=val.masks[:0], ids=val.ids[:0])
    save_prepared(prepared, load_meta(prepared), splits)
    train.train("toy")
    out = capsys.readouterr().out
    assert "epoch 2/2: lr" in out and "val" not in out.split("epoch 1/2")[1]
    summary = json.loads((tiny_dataset / "metrics/toy/train/metrics.json").read_text())
    assert list(summary) == ["train_loss", "runtime"]
    curves = sorted(p.name for p in (tiny_dataset / "metrics/toy/train/plots/metrics").iterdir())
    assert curves == ["lr.tsv", "train_loss.tsv"]
    load_checkpoint(tiny_dataset / "data/models/toy/model.pt")


def test_a_loss_that_does_not_fit_the_task_is_a_clear_error(tiny_dataset, capsys):
    params = yaml.safe_load((tiny_dataset / "params.yaml").read_text())
    params["toy"]["train"]["loss"] = "cross_entropy"
    (tiny_dataset / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(train.train, ["toy"]) == 1
    assert "toy.train.loss: a binary task needs bce, dice or bce_dice" in capsys.readouterr().err
    assert not (tiny_dataset / "data/models/toy/model.pt").exists()


DIGITS = DatasetMeta(
    name="toy",
    task="multiclass",
    classes=["background"] + [f"digit {d}" for d in range(10)],
    colors=[[20 * i, 0, 0] for i in range(11)],
)


def prepared_split(directory, images: np.ndarray, masks: np.ndarray, meta: DatasetMeta = DIGITS) -> PreparedSplit:
    """``images`` and ``masks`` written as the training split of a prepared dataset in ``directory`` (and the
    first of them as its test split), opened: sample ``i`` of the split is ``images[i]``, ``masks[i]``."""
    ids = np.array([f"{i:04d}" for i in range(len(images))])  # the split reads its samples in id order
    save_prepared(
        directory,
        meta,
        {
            "train": Split(images, masks, ids),
            "val": Split(images[:0], masks[:0], ids[:0]),
            "test": Split(images[:1], masks[:1], ids[:1]),
        },
    )
    return open_split(directory, "train")


def test_augmented_batches_depend_on_seed_epoch_and_index_only(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8)
    masks = rng.integers(0, 11, (12, 28, 28), dtype=np.uint8)
    order = rng.permutation(12)
    augment = build_augmentation(AugmentParams(affine=AffineParams()), None, 0, 0)
    split = prepared_split(tmp_path / "prepared", images, masks)

    def batches(epoch):
        return AugmentedBatches(split, order, 5, augment, seed=0, epoch=epoch)

    assert len(batches(0)) == 3 and len(batches(0)[2][0]) == 2  # 5 + 5 + 2
    later_first = batches(0)[2], batches(0)[0]  # any order, any process: the same batch
    loaded = list(augmenting_loader(batches(0), torch.device("cpu")))  # augmented in a worker process
    for (image, mask), (expected_image, expected_mask) in zip((loaded[2], loaded[0]), later_first):
        assert np.array_equal(image.numpy(), expected_image) and np.array_equal(mask.numpy(), expected_mask)
    assert not np.array_equal(batches(1)[0][0], batches(0)[0][0])  # each epoch draws new warps
    # The samples read from the shards are the arrays written: without augmentation, batch 0 is order[:5].
    plain = build_augmentation(AugmentParams(), None, 0, 0)
    image, mask = AugmentedBatches(split, order, 5, plain, seed=0, epoch=0)[0]
    assert np.array_equal(image, images[order[:5]]) and np.array_equal(mask, masks[order[:5]])


def test_inference_pads_only_to_the_models_own_multiple():
    from pipeline.inference import predict_batches

    seen = []
    for model, size in ((SimpleUNet(1, 3, width=4), (28, 28)), (VGGUNet(1, 1, width=4), (40, 45))):
        model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
        images = np.zeros((2, *size, 1), dtype=np.uint8)
        ((index, logits),) = predict_batches(model.eval(), images, 2, "cpu")
        assert logits.shape[-2:] == size  # cropped back to the input
    # SimpleUNet pools twice: 28 x 28 is a multiple of 4 and goes in as it is; the VGG U-Net pools four times.
    assert seen == [(28, 28), (48, 48)]
    assert SimpleUNet.size_multiple == 4 and VGGUNet.size_multiple == 16


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("tta", ["flips", "dihedral"])
def test_test_time_augmentation_averages_the_probabilities_of_each_view(outputs, tta):
    """Recomputed with numpy's flips and turns on whole images, one view at a time: the mean probability."""
    from pipeline.inference import predict_batches

    torch.manual_seed(0)
    model = VGGUNet(1, outputs, width=4).eval()  # pools four times: 40 x 45 is padded, a turn makes it 45 x 40
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 45, 1), dtype=np.uint8)

    def probabilities(logits: torch.Tensor) -> np.ndarray:
        logits = logits.double()
        return (torch.sigmoid(logits) if outputs == 1 else torch.softmax(logits, dim=1)).numpy()

    views = [
        (v, h, t)
        for t in ((False, True) if tta == "dihedral" else (False,))
        for v in (False, True)
        for h in (False, True)
    ]
    expected = 0
    for vflip, hflip, turn in views:
        view = images[:, ::-1] if vflip else images
        view = view[:, :, ::-1] if hflip else view
        view = np.rot90(view, 1, axes=(1, 2)) if turn else view
        ((_, logits),) = predict_batches(model, np.ascontiguousarray(view), 3, "cpu")
        prob = probabilities(logits)
        prob = np.rot90(prob, -1, axes=(2, 3)) if turn else prob
        prob = prob[:, :, :, ::-1] if hflip else prob
        expected = expected + (prob[:, :, ::-1] if vflip else prob)
    expected /= len(views)
    ((index, logits),) = predict_batches(model, images, 3, "cpu", tta)
    assert logits.dtype == torch.float32 and logits.shape == (3, outputs, 40, 45)
    np.testing.assert_allclose(probabilities(logits), expected, rtol=0, atol=1e-6)
    ((_, plain),) = predict_batches(model, images, 3, "cpu")
    assert not np.allclose(probabilities(plain), expected, atol=1e-4)  # the views differ: the test can fail


def test_whole_images_the_network_cannot_take_are_a_param_error(tiny_dataset, capsys):
    params = yaml.safe_load((tiny_dataset / "params.yaml").read_text())
    params["toy"]["train"]["arch"] = "vgg_unet"  # 16 x 16 fits; 18 x 18 below does not
    (tiny_dataset / "params.yaml").write_text(yaml.safe_dump(params))
    prepared = tiny_dataset / "data/prepared/toy"
    splits = {}
    for name in SPLITS:
        split = load_split(prepared, name)
        splits[name] = Split(
            np.pad(split.images, [(0, 0), (0, 2), (0, 2), (0, 0)]),
            np.pad(split.masks, [(0, 0), (0, 2), (0, 2)]),
            split.ids,
        )
    save_prepared(prepared, load_meta(prepared), splits)
    assert run_stage(train.train, ["toy"]) == 1
    err = capsys.readouterr().err
    assert "toy.train.patch_size: the images are 18x18 and vgg_unet takes sides that are multiples of 16" in err

    # Training images of two sizes (each a multiple of 16) cannot be stacked into one batch whole.
    rng = np.random.default_rng(0)
    samples = {
        "train": [
            Sample(f"{i:02d}", rng.integers(0, 256, (*size, 1), dtype=np.uint8), np.zeros(size, np.uint8))
            for i, size in enumerate([(16, 16), (32, 16), (16, 16)])
        ],
        "val": [],
        "test": [Sample("t", np.zeros((16, 16, 1), np.uint8), np.zeros((16, 16), np.uint8))],
    }
    with PreparedWriter(prepared, load_meta(prepared)) as writer:
        for name in SPLITS:
            prints = [sample_fingerprint(name, sample) for sample in samples[name]]
            kept = writer.plan(name, prints)
            for sample, fingerprint in zip(samples[name], prints):
                if fingerprint not in kept:
                    writer.add(name, sample, fingerprint)
    assert run_stage(train.train, ["toy"]) == 1
    assert capsys.readouterr().err == (
        "train toy: error: toy.train.patch_size: the training images have 2 sizes and a batch stacks images of one "
        "size; train on patches (patch_size) instead of whole images\n"
    )


def test_a_patch_larger_than_the_images_is_a_param_error_before_anything_is_allocated(tiny_dataset, capsys):
    """patch_size: 60000 padded every sample to 60000 x 60000 (3.6 GB) in the augmenting worker."""
    params = yaml.safe_load((tiny_dataset / "params.yaml").read_text())
    params["toy"]["train"]["patch_size"] = 60000
    (tiny_dataset / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(train.train, ["toy"]) == 1
    assert (
        "toy.train.patch_size: 60000 is larger than the training images (16x16); at most 16" in capsys.readouterr().err
    )
    assert not (tiny_dataset / "data/models/toy/model.pt").exists()


def test_a_batch_whose_activations_cannot_fit_is_a_param_error_naming_the_most_that_fits(
    tiny_dataset, capsys, monkeypatch
):
    """batch_size 40,000 on MNIST asked for 2 GB per layer output and died in conv2d (or of the OOM killer). Here
    the machine is made small instead of the batch large: the 24 training images make a batch of at most 24."""
    per_image = train_params.activation_bytes(
        {"arch": "simple_unet", "in_channels": 1, "out_channels": 1, "width": 4}, 16, 16
    )
    monkeypatch.setattr(train_params, "available_memory", lambda: 5 * per_image)
    assert run_stage(train.train, ["toy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"train toy: error: toy\.train\.batch_size: 8 images of 16x16 per step need at least "
        r"[\d.]+ MiB of activations \([\d.]+ MiB each\), more than the [\d.]+ MiB available here: "
        r"at most 5",
        err,
    ), err
    assert not (tiny_dataset / "data/models/toy/model.pt").exists()
    monkeypatch.setattr(train_params, "available_memory", lambda: 8 * per_image)  # exactly enough: trains
    assert run_stage(train.train, ["toy"]) == 0


def test_the_activation_estimate_counts_every_layer_output_of_one_image():
    config = {"arch": "simple_unet", "in_channels": 1, "out_channels": 11, "width": 16}
    one = train_params.activation_bytes(config, 28, 28)
    model = build_model(config)
    outputs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: outputs.append(o.numel() * 4))
        for m in model.modules()
        if not any(m.children())
    ]
    model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    assert one == sum(outputs) > 28 * 28 * 16 * 4  # at least the first convolution's output
    assert train_params.activation_bytes(config, 56, 56) == 4 * one


# ------------------------------------------------------------------------------------------ the library's registries


@pytest.fixture
def digits(tmp_path, monkeypatch):
    """A tiny multiclass dataset (MNIST-like bars, 11 classes) with a one-epoch section."""
    from tests.test_resume import mnist_like, write_section

    mnist_like(tmp_path, n_train=16)
    write_section(tmp_path, epochs=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_multiclass_training_honours_its_loss(digits, monkeypatch, capsys):
    from pipeline import engine, losses
    from tests.test_resume import write_section

    built = []
    build_loss = engine.Trainer.build_loss
    monkeypatch.setattr(engine.Trainer, "build_loss", lambda trainer: built.append(build_loss(trainer)) or built[-1])
    train.train("toy")  # the default: cross-entropy, as ever
    write_section(digits, epochs=1, loss="dice")
    train.train("toy")
    assert [type(loss) for loss in built] == [losses.CrossEntropy, losses.MulticlassDice]
    summary = json.loads((digits / "metrics/toy/train/metrics.json").read_text())
    assert 0 < summary["train_loss"] < 1  # one minus a Dice
    write_section(digits, epochs=1, loss="bce_dice")
    capsys.readouterr()
    assert run_stage(train.train, ["toy"]) == 1
    assert capsys.readouterr().err == (
        "train toy: error: toy.train.loss: a multiclass task needs cross_entropy or dice\n"
    )


def test_callbacks_see_every_step_and_every_epoch_end(digits, monkeypatch):
    from pipeline import engine
    from tests.test_resume import write_section

    seen = []

    class Recorder:
        def on_step_start(self, trainer, epoch, step, batches):
            seen.append(("step", epoch, step, len(batches.indices(step))))

        def on_epoch_end(self, trainer, epoch):
            seen.append(("end", epoch, trainer.saved_epochs))

    monkeypatch.setattr(engine, "CALLBACKS", [Recorder()])
    write_section(digits, epochs=2)
    train.train("toy")
    # 16 images in batches of 8: two steps an epoch; each epoch ends once its state is saved
    assert seen == [
        ("step", 0, 0, 8),
        ("step", 0, 1, 8),
        ("end", 0, 1),
        ("step", 1, 0, 8),
        ("step", 1, 1, 8),
        ("end", 1, 2),
    ]


class OneConvolution(torch.nn.Module):
    """A toy architecture: what a new file of pipeline/architectures/ holds."""

    size_multiple = 1

    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_registered_architecture_trains_and_loads(tiny_dataset, monkeypatch, capsys):
    from pipeline import models

    monkeypatch.setitem(models.ARCHITECTURES, "one_convolution", OneConvolution)  # its line in the registry
    params = yaml.safe_load((tiny_dataset / "params.yaml").read_text())
    params["toy"]["train"]["arch"] = "one_convolution"
    (tiny_dataset / "params.yaml").write_text(yaml.safe_dump(params))
    train.train("toy")
    assert "train toy: one_convolution width 4, 10 parameters," in capsys.readouterr().out
    model, _ = load_checkpoint(tiny_dataset / "data/models/toy/model.pt")
    assert isinstance(model, OneConvolution) and count_parameters(model) == 1 * 1 * 9 + 1

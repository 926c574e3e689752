"""Pictures of what the model predicts on the test split: ``python -m pipeline.render <dataset>``.

Writes ``metrics/<dataset>/render/``, replaced as a whole: for a multiclass task an overlay mosaic, an error
mosaic and the confusion matrix (from evaluate's evaluation.json); for a binary task an overlay and a
probability map per test image. The pictures show train's model at the operating point evaluate released it at
(threshold and test-time augmentation, from data/models/<dataset>/release.pt), so they agree with the metrics.
The drawing is pipeline/figures.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.atomic import atomic_path
from pipeline.checkpoint import check_input_channels, load_model, released_evaluation
from pipeline.figures import drawn_size, read_confusion, render_binary, render_multiclass
from pipeline.params import PARAMS_FILE, load_params, require
from pipeline.prepared import open_split
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, run

# matplotlib draws a picture with about 130 bytes per pixel (measured: 2896 x 2896 px peaked 1.0 GiB above the
# stage's 0.5 GiB): this keeps render's peak near 1 GiB; grid 32 x scale 16 on MNIST (a 14,336 px square) took 21.7 GiB.
MAX_PICTURE_SIDE = 2048
MAX_PICTURE_PIXELS = MAX_PICTURE_SIDE**2


@dataclass(frozen=True)
class RenderParams:
    grid: int = 10  # a grid x grid mosaic of test images
    alpha: float = 0.5  # opacity of the predicted mask over the image
    scale: int = 4  # each image pixel becomes scale x scale screen pixels
    batch_size: int = 16  # images per forward pass

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(1 <= self.grid <= 32, f"{key}.grid", f"must be in [1, 32], got {self.grid}")
        require(0 <= self.alpha <= 1, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        require(1 <= self.scale <= 16, f"{key}.scale", f"must be in [1, 16], got {self.scale}")

    def check_picture(self, key: str, task: str, height: int, width: int) -> None:
        """Before drawing: grid and scale may not make a picture of ``height`` x ``width`` test images larger
        than MAX_PICTURE_PIXELS (one image at grid 1 and scale 1 is drawn whatever its size)."""
        tiles = 1 if task == "binary" else self.grid  # a binary task draws each image alone
        h, w = tiles * height * self.scale, tiles * width * self.scale
        settings = f"grid {self.grid} x scale {self.scale}" if tiles > 1 else f"scale {self.scale}"
        require(
            h * w <= max(MAX_PICTURE_PIXELS, height * width),
            key,
            f"{settings} draws a {h} x {w} picture of the {height} x {width} test images ({h * w:,} pixels); "
            f"at most {MAX_PICTURE_PIXELS:,} ({MAX_PICTURE_SIDE} x {MAX_PICTURE_SIDE}): lower "
            f"{'grid or scale' if tiles > 1 else 'scale'}",
        )


def render(dataset: str) -> str:
    """Draw ``metrics/<dataset>/render/`` from the checkpoint, its release and the test split."""
    paths = DatasetPaths(dataset)
    settings = load_params(dataset, "render", RenderParams)
    device = setup(0)
    model_file, model = load_model(paths, device)
    meta = model_file.plan.meta
    test = open_split(paths.prepared, "test")
    check_input_channels(model_file, test.channels, test.where)
    # From the index, before any image is read: the size the pictures will be drawn at.
    settings.check_picture(
        f"{PARAMS_FILE}: {dataset}.render", meta.task, *drawn_size(meta.task, test.sizes, settings.grid)
    )
    # Read before drawing anything: a missing evaluate output should fail fast.
    evaluation = released_evaluation(paths, model_file)
    confusion = None if meta.task == "binary" else read_confusion(paths.evaluation)
    with atomic_path(paths.metrics / "render") as out:
        out.mkdir()
        if meta.task == "binary":
            render_binary(model, test, settings, evaluation.threshold, evaluation.tta, device, out)
        else:
            render_multiclass(model, meta, test, confusion, settings, evaluation.tta, device, out)
    return f"render {dataset}: pictures of the test predictions -> {paths.metrics / 'render'}"


if __name__ == "__main__":
    run(render)

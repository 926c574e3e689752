"""A team working through real remotes: a bare git repository as origin, moto's S3 server and OpenSSH's sshd
as DVC remotes, and several clones of one tiny MNIST project, each driven through git's and DVC's command
lines as the README shows.

One project per module (tests/tiny_project.py): Alice builds the baseline, publishes it, and runs two queued
experiments; the tests then clone origin as teammates and CI would. `pytest -s` prints each step's time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.browser import render_offline
from tests.servers import S3Server, s3_server, sshd_server  # noqa: F401 (fixtures)
from tests.test_plots_offline import chromium  # noqa: F401 (a fixture)
from tests.tiny_project import TINY_PARAMS, dvc, git, make_project, run, set_param, stages_run, tree_digest

# The workflow needs one dataset, not two, and no more images than it takes to train a different model.
PARAMS = {**copy.deepcopy(TINY_PARAMS), "datasets": {"mnist": "mnist"}}
PARAMS["mnist"]["prepare"].update(train_size=64, val_size=16, test_size=20)
BASELINE_EPOCHS = PARAMS["mnist"]["train"]["epochs"]
EXPERIMENTS = {"one-epoch": 1, "three-epochs": 3}  # name: mnist.train.epochs
REMOTE_PATH = "dvc"  # inside the bucket
QUEUE_TIMEOUT_S = 400
UP_TO_DATE = "Data and pipelines are up to date"
MNIST_OUTPUTS = ("data/raw/mnist", "data/prepared/mnist", "data/models/mnist/model.pt")
TRAIN_METRICS = "metrics/mnist/train/metrics.json"


@dataclass
class Team:
    base: Path
    origin: Path
    alice: Path
    alice_env: dict  # AWS credentials only in alice/.dvc/config.local; the endpoint in the tracked .dvc/config
    env: dict  # everyone else: AWS credentials in the environment
    s3: S3Server
    timings: list[tuple[str, float]]

    @contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        yield
        self.timings.append((step, time.perf_counter() - start))

    def clone(self, name: str, *args: str) -> Path:
        """A teammate's fresh clone of origin: the remote and its endpoint come with it, credentials from the
        environment."""
        path = self.base / name
        with self.timed(f"{name}: git clone"):
            git("clone", "-q", *args, str(self.origin), str(path), cwd=self.base, env=self.env)
        return path


def exp_ref(repo: Path, env: dict, name: str) -> str:
    refs = git("for-each-ref", "--format=%(refname)", "refs/exps", cwd=repo, env=env).split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return ref


def model_md5(repo: Path, env: dict, rev: str, path: str = "data/models/mnist/model.pt") -> str:
    """The md5 that ``rev``'s dvc.lock records for one of train@mnist's outputs."""
    lock = yaml.safe_load(git("show", f"{rev}:dvc.lock", cwd=repo, env=env))
    (out,) = [o for o in lock["stages"]["train@mnist"]["outs"] if o["path"] == path]
    return out["md5"]


def cache_file(repo: Path, md5: str) -> Path:
    return repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_queue(repo: Path, env: dict, names) -> None:
    """`dvc exp run --run-all` (it returns once every queued experiment has finished), bounded; then
    `dvc queue status` must list each of ``names`` as a success."""
    try:
        run([sys.executable, "-m", "dvc", "exp", "run", "--run-all"], repo, env, timeout=QUEUE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        dvc("queue", "kill", *names, cwd=repo, env=env, check=False)
        raise AssertionError(f"queued experiments still running after {QUEUE_TIMEOUT_S} s") from None
    status = dvc("queue", "status", cwd=repo, env=env).stdout
    # Rows: task, name, created (e.g. "12:30 PM"), status.
    states = {cells[1]: cells[-1] for cells in map(str.split, status.splitlines()) if cells[1:2] and cells[1] in names}
    failed = [name for name in names if states.get(name) != "Success"]
    logs = "\n".join(dvc("queue", "logs", name, cwd=repo, env=env, check=False).stdout for name in failed)
    assert not failed, f"experiments {failed} did not succeed:\n{status}\n{logs}"


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3_server):
    """Alice's repository, published to origin and to the S3 remote, with two finished queued experiments."""
    base = tmp_path_factory.mktemp("team")
    alice, origin, home = base / "alice", base / "origin.git", base / "home"
    (home / ".ssh").mkdir(parents=True)
    started = time.perf_counter()
    project_env = make_project(alice, base / "mirror", PARAMS)
    git("init", "-q", "--bare", "-b", "main", str(origin), cwd=base, env=project_env)
    # Nothing from the developer's account: no AWS credentials or config, no ~/.ssh/known_hosts.
    alice_env = {**{k: v for k, v in project_env.items() if not k.startswith("AWS_")}, "HOME": str(home)}
    team = Team(
        base=base,
        origin=origin,
        alice=alice,
        alice_env=alice_env,
        s3=s3_server,
        env={
            **alice_env,
            "AWS_ACCESS_KEY_ID": s3_server.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        },
        timings=[("alice: copy the project, git init, git init --bare origin", time.perf_counter() - started)],
    )
    a = team.alice_env
    with team.timed("alice: dvc remote add -d and endpoint (tracked), credentials --local"):
        dvc("remote", "add", "-d", "storage", f"s3://{s3_server.bucket}/{REMOTE_PATH}", cwd=alice, env=a)
        dvc("remote", "modify", "storage", "endpointurl", s3_server.endpoint_url, cwd=alice, env=a)
        dvc("remote", "modify", "--local", "storage", "access_key_id", s3_server.access_key_id, cwd=alice, env=a)
        dvc(
            "remote", "modify", "--local", "storage", "secret_access_key", s3_server.secret_access_key, cwd=alice, env=a
        )
    with team.timed("alice: dvc repro (baseline, 5 stages)"):
        dvc("repro", cwd=alice, env=a)
    with team.timed("alice: git commit, git push, dvc push --run-cache"):
        git("add", "-A", cwd=alice, env=a)
        git("commit", "-qm", "baseline", cwd=alice, env=a)
        git("remote", "add", "origin", str(origin), cwd=alice, env=a)
        git("push", "-q", "-u", "origin", "main", cwd=alice, env=a)
        dvc("push", "--run-cache", cwd=alice, env=a)
    with team.timed("alice: dvc exp run --queue x2, dvc exp run --run-all, dvc queue status"):
        for name, epochs in EXPERIMENTS.items():
            dvc("exp", "run", "--queue", "--name", name, "-S", f"mnist.train.epochs={epochs}", cwd=alice, env=a)
        run_queue(alice, a, EXPERIMENTS)
    yield team
    # The queue's worker stops by itself once idle; make sure it is gone before the directory is.
    dvc("queue", "stop", cwd=alice, env=a, check=False)
    print("\nteam workflow step timings:")
    for step, seconds in team.timings:
        print(f"  {seconds:6.1f} s  {step}")


# The README's command for comparing experiments.
COMPARE = (
    "--only-changed",
    "--drop",
    r"^(?!Experiment$|(metrics/\w+/eval\.json:)?(dice|iou)$|\w+\.(prepare|train|evaluate)\.).*",
)


def test_experiments_compare_in_a_terminal(team):
    """The README's `dvc exp show` and `dvc metrics show` are read in a terminal: 200 columns at most, every
    experiment's name, the param that differs and the headline metrics in full (no cell cut to `…`)."""
    env = {**team.alice_env, "COLUMNS": "200"}
    shown = dvc("exp", "show", *COMPARE, "--no-pager", cwd=team.alice, env=env).stdout
    assert all(name in shown for name in EXPERIMENTS) and "…" not in shown, shown
    header = next(line for line in shown.splitlines() if "Experiment" in line).split()
    # DVC names a metric by its shortest unique form: "dice" here, with one dataset; with two, the file's path too.
    assert header == ["Experiment", "dice", "iou", "mnist.train.epochs"], shown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "dvc exp show " + " ".join(COMPARE[:2]) + f" '{COMPARE[2]}'" in readme
    metrics = dvc("metrics", "show", cwd=team.alice, env=env).stdout
    assert "eval.json" in metrics
    for table in (shown, metrics):
        assert max(map(len, table.splitlines())) <= 200, table


def test_shipped_config_has_no_remote_with_a_relative_url():
    """A relative URL in the tracked config resolves to another place for other revisions (`dvc exp push`,
    `dvc push -a`, `dvc fetch -a` read it from git and resolve it against the filesystem root)."""
    from dvc.config import Config

    # The file as written (Config.load_one would already have made relative paths absolute).
    remotes = Config.load_file(str(Path(__file__).resolve().parents[1] / ".dvc" / "config"))["remote"]
    relative = {
        name: remote["url"]
        for name, remote in remotes.items()
        if "://" not in remote["url"] and not os.path.isabs(remote["url"])
    }
    assert not relative, f"remotes with a relative URL in .dvc/config: {relative}"


def test_credentials_stay_out_of_git(team):
    a, secret = team.alice_env, team.s3.secret_access_key
    assert secret in (team.alice / ".dvc/config.local").read_text()
    assert git("status", "--porcelain", cwd=team.alice, env=a) == ""
    # Not in any tracked file of any commit, here or on origin (git grep exits 1 when nothing matches).
    for repo in (team.alice, team.origin):
        revs = git("rev-list", "--all", cwd=repo, env=a).split()
        found = run(["git", "grep", "-l", "-F", secret, *revs], repo, a, check=False)
        assert found.returncode == 1 and not found.stdout, found.stdout
    # The tracked config names the bucket; a teammate's clone needs credentials of their own.
    clone = team.clone("no-credentials")
    without = {k: v for k, v in team.env.items() if not k.startswith("AWS_")}
    with team.timed("no-credentials: dvc status --cloud, without then with credentials"):
        refused = dvc("status", "--cloud", cwd=clone, env=without, check=False)
        assert refused.returncode != 0 and "Unable to locate credentials" in refused.stderr
        listed = dvc("status", "--cloud", cwd=clone, env=team.env).stdout
    # "deleted": on the remote, not in this clone's cache -- so everything Alice pushed is there.
    assert {line.split()[0] for line in listed.splitlines()} == {"deleted:"}
    assert "data/models/mnist/model.pt" in listed


def test_a_consumer_repository_uses_the_teams_data_and_registry_with_credentials_alone(team):
    """Another project builds on the team's results: `dvc import` of the prepared data, `dvc get` of the model,
    and the model registry (`gto register` / `gto assign` in the team's repository, `dvc artifacts get` by name
    and stage in the consumer's), with nothing but credentials in its environment -- the remote and its endpoint
    travel in the team's tracked .dvc/config. The fetched model then predicts there from that file alone."""
    a, e = team.alice_env, team.env
    with team.timed("alice: gto register mnist, gto assign mnist --stage prod, git push --tags"):
        gto = str(Path(sys.executable).with_name("gto"))  # installed with DVC, beside this Python
        run([gto, "register", "mnist"], team.alice, a)
        run([gto, "assign", "mnist", "--stage", "prod"], team.alice, a)
        git("push", "-q", "origin", "--tags", cwd=team.alice, env=a)
    consumer, origin = team.base / "consumer", str(team.origin)
    consumer.mkdir()
    with team.timed("consumer: git init, dvc init, dvc import, dvc get, dvc artifacts get --stage prod"):
        git("init", "-q", cwd=consumer, env=e)
        dvc("init", "-q", cwd=consumer, env=e)
        dvc("import", origin, "data/prepared/mnist", "-o", "prepared", cwd=consumer, env=e)
        dvc("get", origin, "data/models/mnist/model.pt", "-o", "model.pt", cwd=consumer, env=e)
        dvc("artifacts", "get", origin, "mnist", "--stage", "prod", cwd=consumer, env=e)  # -> release.pt
    prepared = tree_digest(team.alice / "data/prepared/mnist")
    assert {k.replace("mnist/", "prepared/", 1): v for k, v in prepared.items()} == tree_digest(consumer / "prepared")
    assert (consumer / "model.pt").read_bytes() == (team.alice / "data/models/mnist/model.pt").read_bytes()
    release = (team.alice / "data/models/mnist/release.pt").read_bytes()
    assert (consumer / "release.pt").read_bytes() == release
    assert "prepared.dvc" in git("status", "--porcelain", cwd=consumer, env=e)  # the import is tracked there

    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(consumer / "digit.png")
    run(
        [sys.executable, "-m", "pipeline.predict", "--model", "release.pt", "digit.png", "--out", "out"],
        consumer,
        e,
    )
    assert (consumer / "out/digit.png").exists()


def test_experiments_travel_through_origin_and_s3(team, chromium):
    a = team.alice_env
    with team.timed("alice: dvc exp show"):
        shown = dvc("exp", "show", cwd=team.alice, env=a).stdout
    assert all(name in shown for name in EXPERIMENTS)
    ref = exp_ref(team.alice, a, "three-epochs")
    md5 = model_md5(team.alice, a, ref)
    assert md5 != model_md5(team.alice, a, "main")  # three epochs train another model than two
    model_key = f"{REMOTE_PATH}/files/md5/{md5[:2]}/{md5[2:]}"
    assert model_key not in team.s3.keys()
    with team.timed("alice: dvc exp push origin three-epochs"):
        dvc("exp", "push", "origin", "three-epochs", cwd=team.alice, env=a)
    assert model_key in team.s3.keys()  # the experiment's data went to the DVC remote, not only its git ref

    bob = team.clone("bob")
    e = team.env
    with team.timed("bob: dvc exp pull origin three-epochs, dvc exp apply, dvc pull"):
        dvc("exp", "pull", "origin", "three-epochs", cwd=bob, env=e)
        dvc("exp", "apply", "three-epochs", cwd=bob, env=e)
        dvc("pull", cwd=bob, env=e)
    assert sha256((bob / "data/models/mnist/model.pt").read_bytes()) == sha256(cache_file(team.alice, md5).read_bytes())
    for metrics in ("metrics/mnist/eval.json", "metrics/mnist/data.json"):  # in git
        alices = git("show", f"{ref}:{metrics}", cwd=team.alice, env=a)
        assert sha256((bob / metrics).read_bytes()) == sha256(alices.encode()), metrics
    curves = cache_file(team.alice, model_md5(team.alice, a, ref, TRAIN_METRICS))  # cached by DVC, pulled
    assert (bob / TRAIN_METRICS).read_bytes() == curves.read_bytes()
    with team.timed("bob: dvc status, dvc repro (no-op)"):
        assert UP_TO_DATE in dvc("status", cwd=bob, env=e).stdout
        assert stages_run(dvc("repro", cwd=bob, env=e).stdout) == set()

    with team.timed("bob: git commit a branch, dvc metrics diff main --md, dvc params diff main"):
        git("checkout", "-q", "-b", "three-epochs", cwd=bob, env=e)
        git("add", "-A", cwd=bob, env=e)
        git("commit", "-qm", "three epochs", cwd=bob, env=e)
        table = dvc("metrics", "diff", "main", "--md", cwd=bob, env=e).stdout
        params = dvc("params", "diff", "main", cwd=bob, env=e).stdout
    old = json.loads((team.alice / "metrics/mnist/eval.json").read_text())["dice"]
    new = json.loads((bob / "metrics/mnist/eval.json").read_text())["dice"]
    assert metrics_diff_row(table, "metrics/mnist/eval.json", "dice")[:2] == pytest.approx([old, new], abs=1e-4)
    # Training's metrics are cached, not in git: main's come from the remote, Bob never pulled them.
    old_val, new_val = (
        json.loads(path.read_text())["val_dice"] for path in (team.alice / TRAIN_METRICS, bob / TRAIN_METRICS)
    )
    assert metrics_diff_row(table, TRAIN_METRICS, "val_dice")[:2] == pytest.approx([old_val, new_val], abs=1e-4)
    assert ["params.yaml", "mnist.train.epochs", str(BASELINE_EPOCHS), "3"] in [
        line.split() for line in params.splitlines()
    ]

    # CI on Bob's pull request: a fresh clone of the branch checks that it reproduces and reports the change.
    with team.timed("bob: git push origin three-epochs"):
        git("push", "-q", "origin", "three-epochs", cwd=bob, env=e)
    ci = team.clone("ci", "--branch", "three-epochs")
    with team.timed("ci: dvc repro --pull --allow-missing, git fetch origin main, dvc metrics diff origin/main --md"):
        reproduced = dvc("repro", "--pull", "--allow-missing", cwd=ci, env=e)
        assert stages_run(reproduced.stdout) == set()
        assert "WARNING" not in reproduced.stdout + reproduced.stderr, reproduced.stderr  # a quiet CI log
        git("fetch", "-q", "origin", "main", cwd=ci, env=e)
        ci_table = dvc("metrics", "diff", "origin/main", "--md", cwd=ci, env=e).stdout
    assert metrics_diff_row(ci_table, "metrics/mnist/eval.json", "dice")[:2] == pytest.approx([old, new], abs=1e-4)

    # The pull request's report: the same diffs, both revisions' curves drawn, pictures side by side.
    with team.timed("ci: python scripts/pr_report.py --base origin/main --out report"):
        run([sys.executable, "scripts/pr_report.py", "--base", "origin/main", "--out", "report"], ci, e)
    report = (ci / "report/report.md").read_text()
    assert metrics_diff_row(report, "metrics/mnist/eval.json", "dice")[:2] == pytest.approx([old, new], abs=1e-4)
    assert "mnist.train.epochs" in report and "not available" not in report, report
    pictures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert {"mnist-roc.png", "mnist-pr.png", "mnist-train-val_dice.png"} <= set(pictures), pictures
    assert any(p.endswith("-pair.png") for p in pictures), pictures
    for picture in pictures:
        with Image.open(ci / "report" / picture) as drawn:
            assert drawn.format == "PNG" and min(drawn.size) > 100
    # The same report in a browser, offline: every picture it shows is there to load.
    page = render_offline(ci / "report/report.html", ci / "report/screenshot.png", chromium=chromium)
    assert page.divs["report"].img == len(pictures) and "net::ERR" not in page.log, page.log
    assert "<table>" in page.dom and "mnist.train.epochs" in page.dom
    with Image.open(ci / "report/screenshot.png") as shot:
        colours = np.unique(np.asarray(shot.convert("RGB")).reshape(-1, 3), axis=0)
        assert shot.size == (1280, 1600) and len(colours) > 100  # drawn, not blank


def test_a_fresh_clone_restores_a_teammates_training_from_the_run_cache(team):
    """Alice shares her run-cache; Carol, on a fresh clone, asks for params Alice already trained with (one
    of her experiments) and gets Alice's model without training."""
    a, e = team.alice_env, team.env
    ref = exp_ref(team.alice, a, "one-epoch")
    with team.timed("alice: dvc exp push origin one-epoch, dvc push --run-cache"):
        dvc("exp", "push", "origin", "one-epoch", cwd=team.alice, env=a)
        dvc("push", "--run-cache", cwd=team.alice, env=a)
    carol = team.clone("carol")
    set_param(carol, "mnist.train.epochs", EXPERIMENTS["one-epoch"])
    with team.timed("carol: dvc repro --pull --allow-missing with the params of Alice's one-epoch"):
        out = dvc("repro", "--pull", "--allow-missing", cwd=carol, env=e).stdout
    assert "train@mnist" not in stages_run(out), out
    assert "Stage 'train@mnist' is cached - skipping run" in out
    md5 = model_md5(team.alice, a, ref)
    assert sha256((carol / "data/models/mnist/model.pt").read_bytes()) == sha256(
        cache_file(team.alice, md5).read_bytes()
    )
    curves = cache_file(team.alice, model_md5(team.alice, a, ref, TRAIN_METRICS))
    assert (carol / TRAIN_METRICS).read_bytes() == curves.read_bytes()


def metrics_diff_row(markdown: str, path: str, metric: str) -> list[float]:
    """[old, new, change] from `dvc metrics diff --md`'s row for ``metric`` of ``path``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [path, metric]:
            return [float(c) for c in cells[2:5]]
    raise AssertionError(f"no row for {path} {metric} in:\n{markdown}")


def test_ssh_remote_push_then_pull_into_a_fresh_clone(team, sshd_server):
    a, store = team.alice_env, team.base / "ssh-store"
    with team.timed("alice: dvc remote add backup ssh://..., modify --local keyfile"):
        dvc("remote", "add", "backup", sshd_server.url(store), cwd=team.alice, env=a)
        dvc("remote", "modify", "--local", "backup", "keyfile", str(sshd_server.keyfile), cwd=team.alice, env=a)
    # DVC does not check the server's host key: sshfs connects with known_hosts=None. The README says so;
    # if this push starts failing on the missing ~/.ssh/known_hosts, the README needs the ssh-keyscan step.
    assert not (team.base / "home/.ssh/known_hosts").exists()
    with team.timed("alice: dvc push -r backup, git commit .dvc/config, git push"):
        dvc("push", "-r", "backup", cwd=team.alice, env=a)
        git("add", ".dvc/config", cwd=team.alice, env=a)
        git("commit", "-qm", "SSH remote 'backup'", cwd=team.alice, env=a)
        git("push", "-q", "origin", "main", cwd=team.alice, env=a)
    assert list((store / "files/md5").rglob("*"))  # the server's directory holds the objects

    fresh = team.base / "fresh-ssh"
    without_s3 = {k: v for k, v in team.env.items() if not k.startswith("AWS_")}  # nothing can come from S3
    with team.timed("fresh-ssh: git clone, modify --local keyfile, dvc pull -r backup"):
        git("clone", "-q", str(team.origin), str(fresh), cwd=team.base, env=without_s3)
        dvc("remote", "modify", "--local", "backup", "keyfile", str(sshd_server.keyfile), cwd=fresh, env=without_s3)
        dvc("pull", "-r", "backup", cwd=fresh, env=without_s3)
    for output in MNIST_OUTPUTS:
        assert tree_digest(fresh / output) == tree_digest(team.alice / output), output
    assert UP_TO_DATE in dvc("status", cwd=fresh, env=without_s3).stdout


def test_relative_mirror_is_taken_from_the_repository_root(team):
    """DVC runs every stage command in the repository root, wherever `dvc` is started: a relative
    SEGPIPE_MIRROR is taken from there, not from the shell's directory (here pipeline/, where ../mirror
    does not exist)."""
    fresh = team.base / "fresh-mirror"  # beside ../mirror, the synthetic mirror
    git("clone", "-q", str(team.origin), str(fresh), cwd=team.base, env=team.env)
    with team.timed("fresh-mirror: dvc repro download@mnist from pipeline/, SEGPIPE_MIRROR=../mirror"):
        out = dvc(
            "repro",
            "../dvc.yaml:download@mnist",
            cwd=fresh / "pipeline",
            env={**team.env, "SEGPIPE_MIRROR": "../mirror"},
        )
    assert stages_run(out.stdout) == {"../dvc.yaml:download@mnist"}
    assert (team.base / "mirror/mnist").resolve().as_uri() in out.stdout
    assert tree_digest(fresh / "data/raw/mnist") == tree_digest(team.alice / "data/raw/mnist")

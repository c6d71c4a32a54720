"""What a run directory guarantees (README, "Runs and checkpoints"): one writer, no silent overwrite, recovery
advice that works as printed, a divergence that names a checkpoint whose weights are good, one-line errors for a
directory that cannot be written and nothing half-written left behind."""

import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_as_printed, tiny_regression_dict, tiny_vae, tiny_vae_dict

from difflineage.checkpoint import checkpoints_of
from difflineage.errors import RunDirError, TrainingDiverged
from difflineage.storage import DirectoryLock
from difflineage.systems import config_from_dict
from difflineage.train import Trainer


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "difflineage", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def _write_config(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump(tiny_vae_dict(**train)))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------------


def test_a_second_trainer_on_the_same_directory_is_refused_and_the_first_keeps_its_results(tmp_path):
    long = tiny_vae_dict(steps=100000, log_every=1, batch_size=32, seed=1)
    long["model"]["hidden"] = 256
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(long))
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "difflineage", "train", str(tmp_path / "a.yaml"), "--out", str(run),
                              "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                              and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            time.sleep(0.05)
        second = _cli("train", _write_config(tmp_path / "b.yaml", steps=5, seed=2), "--out", run, "--no-progress")
        assert second.returncode == 2, second.stderr
        assert f"run directory {run} is in use by pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        # a resume is a writer too
        again = _cli("train", "--resume", "--out", run, "--no-progress")
        assert again.returncode == 2 and "is in use by pid" in again.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 1  # the first run's config
    steps = [r["step"] for r in _lines(run / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
    assert (run / ".lock").read_text() == ""  # released: no holder recorded


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    result = Trainer(tiny_vae(steps=2), tmp_path, progress=False).fit()
    assert result.status == "finished"
    assert f"took over the lock of {tmp_path} left by pid {dead.pid}" in capsys.readouterr().err


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with DirectoryLock(tmp_path):
        with pytest.raises(RunDirError, match=f"is in use by pid {os.getpid()}"):
            DirectoryLock(tmp_path).acquire()
        with pytest.raises(RunDirError, match="is in use by pid"):
            Trainer(tiny_vae(steps=2), tmp_path, progress=False).fit()
    DirectoryLock(tmp_path).acquire()  # free again once released


# --------------------------------------------------------------------------------------------
# No silent overwrite
# --------------------------------------------------------------------------------------------


def test_training_again_without_resume_is_refused_and_overwrite_replaces_the_whole_run(tmp_path):
    Trainer(tiny_vae(steps=12, checkpoint_every=3, log_every=1), tmp_path, progress=False).fit()
    before = {f: (tmp_path / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    other = tiny_vae(steps=3, checkpoint_every=3, log_every=1, seed=5)
    with pytest.raises(RunDirError) as err:
        Trainer(other, tmp_path, progress=False).fit()
    msg = str(err.value)
    assert f"{tmp_path} already holds a run with 4 checkpoint(s), the latest step_0000012" in msg
    assert f"Continue it with: difflineage train --resume --out {tmp_path}" in msg and "--overwrite" in msg
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # nothing touched
    assert [p.name for p in checkpoints_of(tmp_path)][-1] == "step_0000012"

    Trainer(other, tmp_path, progress=False, overwrite=True).fit()
    assert [p.name for p in checkpoints_of(tmp_path)] == ["step_0000003"]  # none of the old run's checkpoints
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 5
    assert not list(tmp_path.glob(".overwrite-*")) and not list(tmp_path.glob(".removing-*"))


def test_an_interrupted_overwrite_puts_the_old_run_back(tmp_path, capsys):
    Trainer(tiny_vae(steps=4, checkpoint_every=2), tmp_path, progress=False).fit()
    journal = tmp_path / ".overwrite-12345"  # as a crash midway through --overwrite leaves it: no COMPLETE mark
    journal.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "checkpoints"):
        os.replace(tmp_path / name, journal / name)
    result = Trainer(None, tmp_path, resume=True, progress=False).fit()  # the old run, whole again
    assert result.step == 4 and result.status == "finished"
    assert "an --overwrite of" in capsys.readouterr().err and not journal.exists()


def test_resuming_an_earlier_checkpoint_moves_the_later_ones_aside(tmp_path, capsys):
    Trainer(tiny_vae(steps=8, checkpoint_every=2), tmp_path, progress=False).fit()
    early = tmp_path / "checkpoints" / "step_0000004"
    cfg = config_from_dict(tiny_vae_dict(steps=6, checkpoint_every=2, lr=1e-4))
    Trainer(cfg, tmp_path, resume=early, progress=False).fit()
    assert [p.name for p in checkpoints_of(tmp_path)] == ["step_0000002", "step_0000004", "step_0000006"]
    aside = list((tmp_path / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step_0000006", "step_0000008"]
    assert "were moved to" in capsys.readouterr().err
    assert yaml.safe_load((checkpoints_of(tmp_path)[-1] / "config.yaml").read_text())["train"]["lr"] == 1e-4


def test_resume_of_a_run_that_never_wrote_a_checkpoint_says_to_start_again(tmp_path):
    tmp_path.joinpath("config.yaml").write_text("system: vae\n")
    out = _cli("train", "--resume", "--out", tmp_path, "--no-progress")
    assert out.returncode == 2 and "start it again with --overwrite" in out.stderr, out.stderr


# --------------------------------------------------------------------------------------------
# Recovery advice that works as printed
# --------------------------------------------------------------------------------------------


def test_the_printed_resume_command_continues_the_run_as_printed(tmp_path):
    run = tmp_path / "my run"  # a space in the path: the command must quote it
    cfg = _write_config(tmp_path / "c.yaml", steps=8, log_every=1)
    first = _cli("train", cfg, "--out", run, "--stop-at", "3", "--no-progress")
    assert first.returncode == 0, first.stderr
    advice = first.stdout.split("Continue with: ", 1)[1].splitlines()[0]
    assert advice == f"difflineage train --resume --out '{run}'"
    assert "samples None" not in first.stdout
    second = run_as_printed(advice, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "finished at step 8" in second.stdout
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == list(range(1, 9))


def test_quickstart_advice_is_its_own_command(tmp_path):
    t = Trainer(tiny_vae(steps=2), tmp_path, resume_command="difflineage quickstart --system vae")
    assert t.resume_command() == "difflineage quickstart --system vae"
    assert t.resume_command(checkpoint=tmp_path / "c").startswith("difflineage train --resume")


# --------------------------------------------------------------------------------------------
# A divergence names a checkpoint whose weights are good
# --------------------------------------------------------------------------------------------


def test_a_finite_explosion_is_caught_and_the_checkpoint_before_it_named(tmp_path, capsys):
    """The loss grows 30x per step from the 9th call on: step 9 is suspicious (30x the median), step 10 a jump
    (900x). The checkpoint at step 8 was written after the weights that gave step 9's loss, so the good one is 6."""
    cfg = config_from_dict(tiny_regression_dict(steps=40, checkpoint_every=2, spike_window=4, spike_factor=100),
                           ["model.grow_from_call=8"])
    with pytest.raises(TrainingDiverged) as err:
        Trainer(cfg, tmp_path, progress=False).fit()
    msg = str(err.value)
    assert msg.startswith("the loss became ") and "at step 10 (" in msg and "x its median" in msg
    assert f"before the trouble began (at step 9) is {tmp_path}/checkpoints/step_0000006" in msg
    assert "later ones (step_0000008) may hold wrecked weights" in msg
    assert f"--resume {tmp_path}/checkpoints/step_0000006 --out {tmp_path} --set train.lr=0.001" in msg
    assert checkpoints_of(tmp_path)[-1].name == "step_0000008"  # nothing written after the jump

    # The advice, run as printed (through the CLI's own parser, in this process, where the tiny system exists):
    # it continues from step 6 at a tenth of the learning rate, with the suspect step_0000008 moved aside. The tiny
    # system's loss grows again 8 calls after any start, so the continuation diverges later, at step 16.
    from difflineage.cli import main

    advice = msg.split("Continue from it with a lower learning rate: ", 1)[1].split(" (or keep", 1)[0]
    assert main(shlex.split(advice)[1:] + ["--no-progress"]) == 1
    assert "at step 16 (" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 1e-3
    aside = list((tmp_path / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and [p.name for p in aside[0].iterdir()] == ["step_0000008"]
    assert checkpoints_of(tmp_path)[-1].name == "step_0000014"


def test_the_spike_check_can_be_turned_off_and_leaves_ordinary_runs_alone(tmp_path):
    cfg = config_from_dict(tiny_regression_dict(steps=12, spike_window=4, spike_factor=0), ["model.grow_from_call=8",
                                                                                          "model.growth=3"])
    assert Trainer(cfg, tmp_path / "off", progress=False).fit().status == "finished"
    # an ordinary run, checked from its 4th step, is never stopped
    plain = config_from_dict(tiny_vae_dict(steps=60, spike_window=4))
    assert Trainer(plain, tmp_path / "plain", progress=False).fit().status == "finished"


# --------------------------------------------------------------------------------------------
# Directories that cannot be written
# --------------------------------------------------------------------------------------------


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path):
    cfg = _write_config(tmp_path / "c.yaml", steps=2)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file, not a directory" in _one_line_error(_cli("train", cfg, "--out", a_file))
    line = _one_line_error(_cli("train", cfg, "--out", a_file / "run"))
    assert f"cannot create the run directory {a_file}/run: not a directory [Errno 20]" in line
    line = _one_line_error(_cli("train", cfg, "--out", "/proc/self/run"))
    assert "cannot create the run directory /proc/self/run:" in line


def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """A write that fails partway (here a file-size limit, as a full disk does) is named with its cause; the
    checkpoint's temporary directory is removed."""
    big = tiny_vae_dict(steps=3, checkpoint_every=2)
    big["model"]["hidden"] = 256  # weights of ~160 KB: the checkpoint, not the config or log, exceeds the limit
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(big))
    run = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    line = _one_line_error(_cli("train", tmp_path / "c.yaml", "--out", run, "--no-progress", preexec_fn=limit))
    assert f"cannot write the checkpoint {run}/checkpoints/step_0000002: file too large [Errno 27]" in line
    assert "no checkpoint had been written yet" in line and "--overwrite" in line
    assert list((run / "checkpoints").iterdir()) == []  # no .tmp-step_* left


def test_leftover_temporary_checkpoints_are_removed_on_the_next_start(tmp_path, capsys):
    Trainer(tiny_vae(steps=2, checkpoint_every=2), tmp_path, progress=False).fit()
    left = tmp_path / "checkpoints" / ".tmp-step_0000004"  # a second Ctrl-C during a write used to leave this
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 1000)
    Trainer(config_from_dict(tiny_vae_dict(steps=4, checkpoint_every=2)), tmp_path, resume=True, progress=False).fit()
    assert not left.exists() and "left by an interrupted write" in capsys.readouterr().err


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs (needs mount rights: root in the project's CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root); the file-size-limit test covers the same path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_and_a_read_only_disk_are_one_line(tmp_path, tmpfs):
    cfg = tiny_vae_dict(steps=3, checkpoint_every=2)
    cfg["model"]["hidden"] = 2048  # ~1.2 MB per weights file: the checkpoint fills the 2 MB disk
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    line = _one_line_error(_cli("train", tmp_path / "c.yaml", "--out", tmpfs / "run", "--no-progress"))
    assert f"cannot write the checkpoint {tmpfs}/run/checkpoints/step_0000002: no space left on device [Errno 28]" in line
    assert list((tmpfs / "run" / "checkpoints").iterdir()) == []
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode == 0
    line = _one_line_error(_cli("train", tmp_path / "c.yaml", "--out", tmpfs / "other", "--no-progress"))
    assert f"cannot create the run directory {tmpfs}/other: read-only file system [Errno 30]" in line


# --------------------------------------------------------------------------------------------
# EMA with a warm-up: a short run's EMA holds the run's weights
# --------------------------------------------------------------------------------------------


def _tinted_folder(root: Path, per_class: int = 60) -> Path:
    """A folder of RGB digits, each class in its own tint (scikit-learn's 8x8 digits), as a user's own data."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    tints = torch.rand(10, 3, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.3
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        idx = (d.target == c).nonzero()[0][:per_class]
        for i in idx:
            gray = torch.from_numpy(d.images[i] / 16.0)
            rgb = (gray[None] * tints[c][:, None, None] * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(rgb).save(root / f"class{c}" / f"{i}.png")
    return root


def _pixel_fid(system, heldout) -> float:
    from difflineage.eval.metrics import frechet_distance

    with torch.no_grad():
        fake = system.sample(300, generator=torch.Generator().manual_seed(0)).float()
    real = heldout.images.float() / 127.5 - 1
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 2).flatten(1).double()  # noqa: E731 - 48 features
    return frechet_distance(pool(real.repeat(8, 1, 1, 1)), pool(fake))


def test_a_short_runs_ema_samples_are_no_worse_than_its_raw_weights(tmp_path):
    """300 steps at the recipe's decay 0.999: without warm-up the EMA still holds three quarters of the first
    weights and its samples score far worse than the raw weights'; with it they score as well."""
    from difflineage.data import load_dataset

    folder = _tinted_folder(tmp_path / "tinted")
    scores = {}
    for warmup in (True, False):
        cfg = config_from_dict({"system": "vae", "data": {"source": f"folder:{folder}", "image_size": 8, "channels": 3},
                                "model": {"latent_dim": 4, "channels": [16], "hidden": 64},
                                "train": {"steps": 300, "batch_size": 32, "lr": 2e-3, "log_every": 50, "sample_every": 0,
                                          "checkpoint_every": 0, "ema_decay": 0.999, "ema_warmup": warmup}})
        t = Trainer(cfg, tmp_path / f"run-{warmup}", progress=False)
        t.fit()
        heldout = load_dataset(t.config.data, "heldout")
        scores[warmup] = {"ema": _pixel_fid(t.ema.module.eval(), heldout), "raw": _pixel_fid(t.system.eval(), heldout)}
    assert scores[True]["ema"] <= 1.1 * scores[True]["raw"], scores
    assert scores[False]["ema"] > 1.5 * scores[False]["raw"], scores  # the failure the warm-up removes


def test_ema_decay_warm_up():
    from difflineage.train.trainer import ema_decay_at

    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 300) == pytest.approx(301 / 310)
    assert ema_decay_at(0.999, 20000) == 0.999 and ema_decay_at(0.999, 1, warmup=False) == 0.999


def test_readers_see_only_complete_checkpoints(tmp_path):
    """sample/evaluate take no lock: a checkpoint being written (.tmp-*) or replaced is never what they pick."""
    import difflineage

    Trainer(tiny_vae(steps=2, checkpoint_every=2), tmp_path, progress=False).fit()
    (tmp_path / "checkpoints" / ".tmp-step_0000004").mkdir()  # a write in progress
    (tmp_path / "checkpoints" / ".tmp-step_0000004" / "config.yaml").write_text("half")
    assert difflineage.load(tmp_path).config.train.steps == 2
    from difflineage.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(tmp_path).name == "step_0000002"

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_as_printed, state_equal, tiny_regression_dict, tiny_vae, tiny_vae_dict

from difflineage.errors import CheckpointError, ConfigError
from difflineage.systems import config_from_dict
from difflineage.train import Trainer, TrainingDiverged, load_checkpoint, lr_at

REPO = Path(__file__).resolve().parents[1]


def test_resume_continues_exactly(tmp_path):
    """K steps, stop, resume to 2K == 2K straight through: weights, EMA, optimizer moments and the log.
    The VAE's loss draws random noise and random binarisations, and the schedule is cosine with
    warm-up, so the RNG, data-order, EMA and optimizer state all have to come back exactly."""
    cfg = tiny_vae(steps=12, warmup_steps=3, lr_schedule="cosine", log_every=1)
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(cfg, tmp_path / "b", stop_at=6, progress=False).fit()
    assert first.status == "stopped" and first.step == 6
    resumed = Trainer(None, tmp_path / "b", resume=True, progress=False)
    result = resumed.fit()
    assert result.status == "finished" and result.step == 12
    assert state_equal(straight.system.state_dict(), resumed.system.state_dict()) == []
    assert state_equal(straight.ema.module.state_dict(), resumed.ema.module.state_dict()) == []
    a, b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    log = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in log(tmp_path / "a")] == [r["loss"] for r in log(tmp_path / "b")]


def test_signal_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    """SIGTERM mid-run: the process writes a checkpoint and exits 130; resuming reaches the same
    weights as an uninterrupted run."""
    d = tiny_vae_dict(steps=3000, log_every=1, batch_size=32)
    d["model"]["hidden"] = 256
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float sums as this process
    proc = subprocess.Popen([sys.executable, "-m", "difflineage", "train", str(cfg_file), "--out", str(run), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    ckpt = load_checkpoint(run)
    stopped_at = ckpt.step
    assert 3 <= stopped_at < 3000, out
    assert f"Continue with: difflineage train --resume --out {run}" in out and "samples None" not in out

    total = stopped_at + 20
    cfg = config_from_dict(d, [f"train.steps={total}"])
    resumed = Trainer(cfg, run, resume=True, progress=False)
    resumed.fit()
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    straight.fit()
    assert state_equal(straight.system.state_dict(), resumed.system.state_dict()) == []


def test_resume_keeps_the_log_window_the_divergence_watch_and_the_configured_optimizer(tmp_path):
    log = lambda d: [{k: v for k, v in json.loads(x).items() if k != "images_per_s"}  # noqa: E731
                     for x in (d / "metrics.jsonl").read_text().splitlines()]
    # stopped between two log steps: the next row averages the same steps as straight through
    cfg = tiny_vae(steps=12, log_every=4)
    Trainer(cfg, tmp_path / "a", progress=False).fit()
    Trainer(cfg, tmp_path / "b", stop_at=6, progress=False).fit()
    Trainer(None, tmp_path / "b", resume=True, progress=False).fit()
    assert log(tmp_path / "a") == log(tmp_path / "b") and len(log(tmp_path / "a")) == 3

    # the watch keeps its recent values: a resumed run stops where a straight one does and names the same checkpoint
    grow = config_from_dict(tiny_regression_dict(steps=40, checkpoint_every=2, log_every=100, spike_window=4,
                                                 spike_factor=100), ["model.grow_from_step=9"])
    messages = []
    for run, stop_at in (("straight", None), ("resumed", 8)):
        if stop_at:
            Trainer(grow, tmp_path / run, stop_at=stop_at, progress=False).fit()
        with pytest.raises(TrainingDiverged) as err:
            Trainer(grow if not stop_at else None, tmp_path / run, resume=bool(stop_at), progress=False).fit()
        messages.append(str(err.value).replace(str(tmp_path / run), "RUN").split(". Continue")[0])
    assert messages[0] == messages[1] and "at step 11 (" in messages[0], messages

    # weight decay and betas changed on resume are the ones used, as in a fresh run (the loaded state had its own)
    Trainer(tiny_vae(steps=4), tmp_path / "c", stop_at=2, progress=False).fit()
    changed = ["train.weight_decay=0.5", "train.betas=[0.5,0.6]"]
    resumed = Trainer(config_from_dict(tiny_vae_dict(steps=4), changed), tmp_path / "c", resume=True, progress=False)
    resumed.fit()
    fresh = Trainer(config_from_dict(tiny_vae_dict(steps=1), changed), tmp_path / "d", progress=False)
    fresh.fit()
    hyper = lambda t: [(g["weight_decay"], tuple(g["betas"])) for g in t.optimizer.param_groups]  # noqa: E731
    assert hyper(resumed) == hyper(fresh) and (0.5, (0.5, 0.6)) in hyper(resumed)


def test_resume_without_ema_weights_is_refused_by_name_and_keeps_the_runs_device(tmp_path):
    Trainer(tiny_vae(steps=2, checkpoint_every=2, device="cpu"), tmp_path, progress=False).fit()
    assert Trainer(None, tmp_path, resume=True, progress=False)._resumed_device() == "cpu"
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    (ckpt / "ema.safetensors").unlink()
    (ckpt / "checksums.sha256").unlink()  # as a hand-assembled checkpoint would be
    with pytest.raises(CheckpointError, match="step_0000002 has no ema.safetensors, which resuming needs"):
        Trainer(config_from_dict(tiny_vae_dict(steps=4)), tmp_path, resume=True, progress=False).fit()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = config_from_dict(tiny_regression_dict(steps=10, checkpoint_every=2), ["model.nan_at_call=6"])
    with pytest.raises(TrainingDiverged) as err:
        Trainer(cfg, tmp_path, progress=False).fit()
    msg = str(err.value)
    assert "loss became nan at step 6" in msg and "before the trouble began (at step 6) is" in msg
    assert f"--resume {tmp_path}/checkpoints/step_0000004 --out {tmp_path} --set train.lr=0.001" in msg
    ckpt = load_checkpoint(tmp_path)  # still loads, checksums and all
    assert ckpt.step == 4
    assert not (tmp_path / "checkpoints" / "step_0000006").exists()


def test_cli_reports_divergence_with_status_1(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_vae_dict(lr=1e30, steps=50)))
    proc = subprocess.run([sys.executable, "-m", "difflineage", "train", str(cfg_file), "--out", str(tmp_path / "r"),
                           "--no-progress", "--set", "train.grad_clip=0"], capture_output=True, text=True)
    assert proc.returncode == 1 and "became nan" in proc.stderr, proc.stderr
    # With no checkpoint yet, the advice is to start again with a lower learning rate, by a command that runs as
    # printed (it is accepted by the run directory; at 1e29 it diverges again, which shows that it trained).
    assert "no checkpoint was written before the trouble began" in proc.stderr and "--resume" not in proc.stderr
    advice = proc.stderr.split("Start again with a lower learning rate: ", 1)[1].split(" (or keep", 1)[0]
    assert advice.startswith("difflineage train ") and "--overwrite --set train.lr=1e+29" in advice
    again = run_as_printed(advice, "--no-progress")
    assert again.returncode == 1 and "became nan" in again.stderr, again.stderr
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["lr"] == 1e29


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(tiny_vae(steps=2), tmp_path, progress=False).fit()
    other = config_from_dict(tiny_vae_dict(steps=4), ["model.latent_dim=5"])
    with pytest.raises(ConfigError, match="model differs from the checkpoint's"):
        Trainer(other, tmp_path, resume=True, progress=False).fit()


def test_batch_larger_than_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="exceeds the .* training images"):
        Trainer(tiny_vae(batch_size=5000), tmp_path, progress=False).fit()


def test_lr_schedule():
    cfg = tiny_vae(steps=10, warmup_steps=2, lr_schedule="cosine", lr=1.0).train
    assert lr_at(0, cfg) == pytest.approx(0.5) and lr_at(1, cfg) == pytest.approx(1.0)
    assert lr_at(2, cfg) == pytest.approx(1.0) and lr_at(6, cfg) == pytest.approx(0.5) and lr_at(10, cfg) == pytest.approx(0.0)


def test_bf16_autocast_trains_and_stays_close_to_fp32(tmp_path):
    a = Trainer(tiny_vae(steps=4), tmp_path / "fp32", progress=False)
    a.fit()
    b = Trainer(tiny_vae(steps=4, bf16=True), tmp_path / "bf16", progress=False)
    b.fit()
    la = [json.loads(x)["loss"] for x in (tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(x - y) / x < 0.02 for x, y in zip(la, lb)), (la, lb)


def test_ema_averages_floats_and_copies_integer_buffers():
    from difflineage.train.trainer import EMA

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.register_buffer("codes", torch.tensor([7, 8], dtype=torch.uint8))

    net = Net()
    ema = EMA(net, 0.9, warmup=False)
    ema.update(net)  # the first update copies
    with torch.no_grad():
        net.w.fill_(1.0)
        net.codes.copy_(torch.tensor([200, 3]))
    ema.update(net)
    assert torch.allclose(ema.module.w, torch.full((3,), 0.1)) and ema.module.codes.tolist() == [200, 3]
    with torch.no_grad():
        net.w.fill_(float("nan"))
    ema.update(net, skip=torch.tensor(True))  # a skipped update changes nothing
    assert torch.allclose(ema.module.w, torch.full((3,), 0.1)) and ema.updates == 3


def test_deferred_sync_follows_the_per_step_loop_exactly(tmp_path):
    """train.sync=deferred (the CUDA default: numbers read only at log, sample and checkpoint steps) gives the same
    weights, EMA and log as reading every step, and resumes as exactly."""
    cfg = lambda mode, **kw: tiny_vae(steps=12, log_every=4, checkpoint_every=6, sync=mode, **kw)  # noqa: E731
    step = Trainer(cfg("step"), tmp_path / "step", progress=False)
    step.fit()
    deferred = Trainer(cfg("deferred"), tmp_path / "deferred", progress=False)
    deferred.fit()
    assert state_equal(step.system.state_dict(), deferred.system.state_dict()) == []
    assert state_equal(step.ema.module.state_dict(), deferred.ema.module.state_dict()) == []
    log = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in log(tmp_path / "step")] == [r["loss"] for r in log(tmp_path / "deferred")]
    Trainer(cfg("deferred"), tmp_path / "resumed", stop_at=5, progress=False).fit()
    resumed = Trainer(None, tmp_path / "resumed", resume=True, progress=False)
    resumed.fit()
    assert state_equal(step.system.state_dict(), resumed.system.state_dict()) == []


def test_deferred_sync_never_lets_a_nan_into_the_weights(tmp_path):
    cfg = config_from_dict(tiny_regression_dict(steps=10, checkpoint_every=4, log_every=100, sync="deferred"),
                           ["model.nan_at_call=6"])
    t = Trainer(cfg, tmp_path, progress=False)
    with pytest.raises(TrainingDiverged) as err:
        t.fit()
    msg = str(err.value)
    assert "the loss became nan at step 6" in msg and "step_0000004" in msg  # found at the checkpoint step 8
    assert not (tmp_path / "checkpoints" / "step_0000008").exists()  # nothing written after it
    for tensors in (t.system.state_dict(), t.ema.module.state_dict()):
        assert all(torch.isfinite(v).all() for v in tensors.values())  # the device skipped every NaN step


def test_deferred_sync_catches_a_finite_explosion_and_names_the_same_checkpoint(tmp_path):
    cfg = config_from_dict(tiny_regression_dict(steps=40, checkpoint_every=2, log_every=100, spike_window=4,
                                                spike_factor=100, sync="deferred"), ["model.grow_from_call=8"])
    with pytest.raises(TrainingDiverged) as err:
        Trainer(cfg, tmp_path, progress=False).fit()
    msg = str(err.value)
    assert "at step 10 (" in msg and f"(at step 9) is {tmp_path}/checkpoints/step_0000006" in msg
    assert not (tmp_path / "checkpoints" / "step_0000010").exists()

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny_vae, tiny_vae_dict
from PIL import Image

from difflineage.cli import main
from difflineage.train import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    Trainer(tiny_vae(steps=4), d, progress=False).fit()
    return d


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "difflineage", "--help"], capture_output=True, text=True).stdout
    for cmd in ("quickstart", "train", "sample", "evaluate", "info"):
        assert cmd in out
    for cmd in ("quickstart", "train", "sample", "evaluate", "info"):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0


def test_sample_writes_grid_and_adm_npz(run, tmp_path, capsys):
    assert main(["sample", str(run), "--n", "6", "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz")]) == 0
    assert Image.open(tmp_path / "g.png").size[0] > 8
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8  # ADM's layout: gray in all three channels
    assert np.array_equal(arr[..., 0], arr[..., 2]) and "arr_1" not in np.load(tmp_path / "s.npz")  # unconditional


def test_sample_writes_the_systems_pictures(run, tmp_path):
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "g.png"), "--pictures", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "reconstructions.png").exists() and (tmp_path / "pics" / "interpolations.png").exists()


def test_sample_label_on_unconditional_checkpoint_is_refused(run, tmp_path, capsys):
    assert main(["sample", str(run), "--label", "3", "--out", str(tmp_path / "g.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_evaluate_writes_metrics(run, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--n", "40", "--k", "4", "--out", str(out), "--npz", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["split"] == "heldout" and m["iw_samples"] == 4 and m["nll_iw_nats"] <= m["neg_elbo_nats"]
    assert m["samples"] == 40 and m["feature_network"] == "MNIST features" and m["real_baseline_images"] == 40
    for key in ("fid", "fid_real", "kid", "kid_real", "inception_score", "precision", "recall"):
        assert isinstance(m[key], float), key
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (40, 8, 8, 3)
    assert "machine" in m and m["real_baseline_split"] == "train"


def test_scoring_against_the_training_split_takes_its_real_baseline_from_the_other(run, tmp_path):
    out = tmp_path / "m.json"
    assert main(["evaluate", str(run), "--n", "20", "--split", "train", "--k", "2", "--out", str(out),
                 "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["split"] == "train" and m["real_baseline_split"] == "heldout" and m["real_baseline_images"] == 20
    assert m["precision_real"] < 1.0  # real images of the reference itself would all lie inside its manifold


def test_evaluate_refuses_options_the_system_lacks(run, tmp_path, capsys):
    assert main(["evaluate", str(run), "--n", "10", "--guidance", "2", "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 2
    assert "does not take these sampling options" in capsys.readouterr().err


def test_evaluate_spreads_sampling_over_torchrun_processes(run, tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "difflineage", "evaluate", str(run), "--num-samples", "30", "--batch-size", "7", "--k", "2", "--no-progress"]
    one = subprocess.run([sys.executable, *cmd, "--npz", str(tmp_path / "one.npz"), "--out", str(tmp_path / "one.json")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *cmd,
                          "--npz", str(tmp_path / "two.npz"), "--out", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    a, b = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert a.shape == (30, 8, 8, 3) and np.array_equal(a, b)  # the same samples, whatever the process count
    assert json.loads((tmp_path / "two.json").read_text())["fid"] == pytest.approx(json.loads((tmp_path / "one.json").read_text())["fid"], rel=1e-6)


def test_info_reports_arithmetic(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)["forward_passes"]
    dec = flops["sampling: decoder (one image)"]
    assert dec["flops"] == 2 * dec["macs"] and dec["macs"] > 0


def test_info(run, capsys):
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps_trained"] == 4 and info["system"] == "vae" and info["parameters"] > 0
    assert info["config"]["data"]["num_classes"] == 10  # resolved from the data and stored


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(tiny_vae_dict()))
    assert main(["train", str(f), "--out", str(tmp_path / "r"), "--set", "model.latnt_dim=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key in model 'model.latnt_dim'" in err and "did you mean 'model.latent_dim'" in err


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    code = main(["quickstart", "--system", "vae", "--out", str(tmp_path), "--no-progress", "--eval-k", "2", "--eval-n", "30",
                 "--set", "train.steps=3", "train.sample_every=0", "train.checkpoint_every=0"])
    assert code == 0
    out = capsys.readouterr().out
    for name in ("samples.png", "reconstructions.png", "interpolations.png", "metrics.json", "loss.png"):
        assert (tmp_path / name).exists() and name in out


def test_default_quickstart_is_the_dit_with_its_first_stage(tmp_path, capsys):
    """The flagship quickstart trains the autoencoder, then the latent DiT (steps cut down here per stage)."""
    code = main(["quickstart", "--out", str(tmp_path), "--no-progress", "--eval-n", "20",
                 "--set", "autoencoder-mnist:train.steps=2", "autoencoder-mnist:train.sample_every=0",
                 "train.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "model.dit.depth=1",
                 "model.diffusion.sample_steps=5", "train.batch_size=16", "*:train.ema_warmup=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "quickstart (dit)" in out and "class accuracy" in out
    for name in ("samples.png", "reconstructions.png", "metrics.json", "autoencoder/checkpoints"):
        assert (tmp_path / name).exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["system"] == "dit"
    assert yaml.safe_load((tmp_path / "autoencoder" / "config.yaml").read_text())["train"]["steps"] == 2
    for stage in (tmp_path, tmp_path / "autoencoder"):  # '*:KEY=VALUE' reaches every stage
        assert yaml.safe_load((stage / "config.yaml").read_text())["train"]["ema_warmup"] is False
    assert main(["quickstart", "--out", str(tmp_path / "x"), "--set", "ldm-mnist:train.steps=1"]) == 2
    assert "not a stage of the dit quickstart" in capsys.readouterr().err


def test_sample_refuses_options_the_system_lacks(run, tmp_path, capsys):
    assert main(["sample", str(run), "--n", "2", "--guidance", "3", "--out", str(tmp_path / "g.png")]) == 2
    assert "guidance" in capsys.readouterr().err


def test_dalle_quickstart_chains_three_stages(tmp_path, capsys):
    """dVAE and CLIP first, then the transformer, which is given both checkpoints ({dvae}, {clip})."""
    small = ["train.steps=2", "train.sample_every=0", "train.checkpoint_every=0", "train.batch_size=16"]
    sets = [f"{stage}:{o}" for stage in ("dalle-dvae-mnist", "dalle-clip-mnist") for o in small]
    sets += ["dalle-dvae-mnist:model.dvae.channels=16", "dalle-dvae-mnist:model.dvae.codes=32",
             "dalle-clip-mnist:model.clip.channels=8", "dalle-clip-mnist:model.clip.text.width=16"]
    sets += small + ["model.transformer.width=32", "model.transformer.depth=1", "model.transformer.heads=2"]
    code = main(["quickstart", "--system", "dalle", "--out", str(tmp_path), "--no-progress", "--eval-n", "20",
                 "--set", *sets])
    assert code == 0
    out = capsys.readouterr().out
    assert "quickstart (dalle)" in out and "CLIP score" in out and (tmp_path / "captions.png").exists()
    model = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert model["first_stage"].startswith(str(tmp_path / "dvae")) and model["clip_stage"].startswith(str(tmp_path / "clip"))
    assert model["dvae"]["codes"] == 32 and model["clip"]["channels"] == 8  # read from the earlier stages


def test_train_resume_takes_set_overrides(tmp_path, capsys):
    Trainer(tiny_vae(steps=2), tmp_path, progress=False).fit()
    # the README's way to continue a run for longer: no CONFIG, the checkpoint's config with --set applied
    assert main(["train", "--resume", "--out", str(tmp_path), "--no-progress", "--set", "train.steps=3"]) == 0
    assert "finished at step 3" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_set_given_twice_keeps_both_overrides():
    from difflineage.cli import build_parser

    for cmd in (["train", "vae-mnist"], ["quickstart"]):
        args = build_parser().parse_args([*cmd, "--set", "train.steps=3", "--set", "train.lr=0.5", "model.latent_dim=2"])
        assert args.overrides == ["train.steps=3", "train.lr=0.5", "model.latent_dim=2"]  # the first --set was lost


def test_the_command_line_is_one_in_its_devices_version_and_help(monkeypatch, tmp_path, capsys):
    """--device is auto everywhere (resolved where one process runs, left to each process under torchrun),
    --version answers, the top-level help has no markup, and --no-progress training prints its log lines."""
    import torch

    from difflineage.cli import build_parser, main

    parser = build_parser()
    commands = {"sample": ["x"], "score": ["a.npz", "--reference", "r.npz", "--inception-weights", "w"],
                "demo": [], "evaluate": ["x"], "extract": ["--first-stage", "x", "--data", "digits", "--image-size", "8", "--out", "o"]}
    for command, rest in commands.items():
        want = "auto" if command in ("evaluate", "extract") else "cpu"
        assert parser.parse_args([command, *rest]).device == want, command
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_parser().parse_args(["sample", "x"]).device == "cuda:0"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("difflineage ")
    parser.print_help()
    assert "``" not in capsys.readouterr().out
    from helpers import tiny_vae_dict

    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(tiny_vae_dict(steps=4, log_every=2)))
    assert main(["train", str(tmp_path / "vae.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vae step 2/4: loss " in out and "vae step 4/4: loss " in out


def test_sample_scale_enlarges_the_grid_pixel_by_pixel(tmp_path):
    from PIL import Image

    from difflineage.cli import main

    vae = str(Path(__file__).parent / "fixtures" / "systems" / "vae")
    sizes = {}
    for scale in (1, 3):
        assert main(["sample", vae, "--n", "4", "--nrow", "2", "--scale", str(scale), "--out",
                     str(tmp_path / f"{scale}.png")]) == 0
        sizes[scale] = Image.open(tmp_path / f"{scale}.png").size
    assert sizes[3] == (3 * sizes[1][0], 3 * sizes[1][1])
    small, large = (np.asarray(Image.open(tmp_path / f"{s}.png")) for s in (1, 3))
    assert np.array_equal(large[::3, ::3], small)
    assert main(["sample", vae, "--scale", "0", "--out", str(tmp_path / "0.png")]) == 2


def test_one_name_per_option_the_field_s_names_and_described_help(tmp_path, capsys):
    """sample and reference take --num-samples as evaluate does; train takes the official scripts' --model DiT-XL/2
    as the DiT's size; info --help says what it shows."""
    from difflineage.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sample", "run", "--num-samples", "5"]).n == 5
    assert parser.parse_args(["evaluate", "run", "--num-samples", "7"]).n == 7
    assert parser.parse_args(["reference", "--data", "mnist5k", "--image-size", "28", "--out", "x.npz",
                              "--inception-weights", "w.pth",
                              "--num-samples", "9"]).n == 9
    args = parser.parse_args(["sample", "run", "--cfg-scale", "1.5", "--num-sampling-steps", "250"])
    assert (args.guidance, args.steps) == (1.5, 250)
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "the arithmetic of each forward pass" in capsys.readouterr().out
    out = tmp_path / "dit"
    assert main(["train", "dit-mnist", "--model", "DiT-S/8", "--out", str(out), "--no-progress", "--set",
                 "train.steps=1", "train.batch_size=4", "train.sample_n=1", "model.diffusion.sample_steps=1"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["dit"]["name"] == "DiT-S/8"

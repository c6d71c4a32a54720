"""Stable Diffusion from released-style files: a tiny random SD 1.x and 2.x made with diffusers and transformers and
saved as diffusers folders; ours loads them, and from the same initial latents draws the image
``StableDiffusionPipeline`` draws to 1e-4 (DDIM-20 and DPM-Solver++-20 with guidance); both layouts are written and
read back; other files and bad input are refused in one line."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from difflineage.errors import CheckpointError, ConfigError
from difflineage.interop.stable_diffusion import read_stable_diffusion, write_diffusers_folder, write_single_file
from difflineage.systems.stable_diffusion import StableDiffusion
from helpers import make_tiny_sd

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red apple on a table", "an astronaut riding a horse", "thumbs up: medium-dark skin tone",
            "blurry, low quality"]


@pytest.fixture(scope="module", params=[1, 2], ids=["sd1", "sd2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"sd{request.param}")
    return request.param, folder, make_tiny_sd(request.param, folder, CAPTIONS * 20)


def _theirs(pipe, folder, scheduler, caption, negative, latents, steps=20, guidance=7.5):
    """The pipeline's image with ``scheduler`` made from the folder's scheduler config (as users swap them)."""
    pipe.scheduler = getattr(diffusers, scheduler).from_pretrained(str(folder), subfolder="scheduler")
    with torch.no_grad():
        return pipe(caption, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents.clone(), output_type="pt").images


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_pipeline_matches_diffusers(tiny, sampler, scheduler):
    version, folder, pipe = tiny
    ours = StableDiffusion.from_pretrained(folder)
    assert ours.version == f"{version}.x" and ours.diffusion.prediction.value == ("eps" if version == 1 else "v")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    captions, negative = CAPTIONS[:2], ["", CAPTIONS[3]]
    want = _theirs(pipe, folder, scheduler, captions, negative, latents)
    got = (ours.sample(captions, negative, steps=20, guidance=7.5, sampler=sampler, latents=latents,
                       progress=False) + 1) / 2
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert (got - want).abs().max().item() < 1e-4


def test_half_precision_weights(tiny, tmp_path, capsys):
    """Loaded in bf16 (diffusers' ``torch_dtype``, ``--dtype bf16``): every network's weights in bf16, the sampler's
    state in float32, the image near the float32 one; ``--dtype`` is refused for a difflineage run."""
    from difflineage.cli import main

    version, folder, _ = tiny
    full = StableDiffusion.from_pretrained(folder)
    half = StableDiffusion.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and {p.dtype for p in half.parameters()} == {torch.bfloat16}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = (m.sample(CAPTIONS[0], latents=latents, steps=8, sampler="dpmpp_2m", progress=False) for m in (full, half))
    assert b.dtype == torch.float32 and b.shape == a.shape
    assert 0 < (a - b).abs().mean().item() < 0.03  # bf16's rounding (3 significant digits), not another image
    assert main(["sample", f"sd:{folder}", "--caption", CAPTIONS[0], "--steps", "2", "--size", "16", "--dtype", "bf16",
                 "--out", str(tmp_path / "half.png")]) == 0
    assert main(["sample", str(tmp_path / "run"), "--dtype", "bf16"]) == 2
    assert "--dtype applies to Stable Diffusion" in capsys.readouterr().err


def test_layouts_written_and_read_back(tiny, tmp_path):
    """Our diffusers folder loads in diffusers and draws its image; our single file loads back in ours."""
    version, folder, pipe = tiny
    weights = read_stable_diffusion(folder)
    out = write_diffusers_folder(weights, tmp_path / "folder")
    again = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None,
                                                              requires_safety_checker=False)
    again.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    want = _theirs(pipe, folder, "DDIMScheduler", CAPTIONS[0], "", latents, steps=5)
    assert (_theirs(again, out, "DDIMScheduler", CAPTIONS[0], "", latents, steps=5) - want).abs().max().item() < 1e-5
    single = write_single_file(weights, tmp_path / "model.safetensors")
    ours = StableDiffusion.from_pretrained(single, tokenizer=folder / "tokenizer")
    got = (ours.sample(CAPTIONS[0], steps=5, latents=latents, progress=False) + 1) / 2
    assert (got - want).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match=f"a Stable Diffusion {version}.x model .* read as"):
        read_stable_diffusion(single, version="2.x" if version == 1 else "1.x")
    if version == 2:  # a 2.x file that does not say what it predicts is refused, naming the choice
        from difflineage.weights import read_weights

        bare = tmp_path / "bare.safetensors"
        save_file(read_weights(single, "test"), str(bare))
        with pytest.raises(CheckpointError, match="prediction='v' or 'eps'"):
            read_stable_diffusion(bare, tokenizer=folder / "tokenizer")


def test_single_file_without_tokenizer_says_so(tiny, tmp_path):
    _, folder, _ = tiny
    single = write_single_file(read_stable_diffusion(folder), tmp_path / "m.safetensors")
    model = StableDiffusion.from_pretrained(single, prediction="eps")
    with pytest.raises(CheckpointError, match="no tokenizer.*--tokenizer PATH"):
        model.sample("a red apple", steps=2, progress=False)


def test_bad_input_is_named(tiny, tmp_path):
    _, folder, _ = tiny
    model = StableDiffusion.from_pretrained(folder)
    with pytest.raises(ConfigError, match=r"image size 15 is not divisible by 2 \(the VAE's downsampling\); use 14 or 16"):
        model.sample("a red apple", steps=2, size=(16, 15), progress=False)
    long = " ".join(["a red apple on a table"] * 20)
    with pytest.warns(UserWarning, match="cut to 77 tokens"):
        model.encode_text([long])
    # a truncated file
    single = write_single_file(read_stable_diffusion(folder), tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_stable_diffusion(cut)
    # files of other models, by what they look like
    vae_only = tmp_path / "vae.safetensors"
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in model.vae.state_dict().items()}, str(vae_only))
    with pytest.raises(CheckpointError, match="a VAE alone"):
        read_stable_diffusion(vae_only)
    dit = tmp_path / "dit.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(1), "blocks.0.adaLN_modulation.1.weight": torch.zeros(1),
               "t_embedder.mlp.0.weight": torch.zeros(1)}, str(dit))
    with pytest.raises(CheckpointError, match="a DiT checkpoint"):
        read_stable_diffusion(dit)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sdxl))
    with pytest.raises(CheckpointError, match="an SDXL checkpoint"):
        read_stable_diffusion(sdxl)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "unet").mkdir()
    with pytest.raises(CheckpointError, match="lacks text_encoder/, vae/"):
        read_stable_diffusion(tmp_path / "broken")
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="a DDPM model"):
        read_stable_diffusion(tmp_path / "ddpm")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timesteps_as_diffusers_schedulers_visit_them(spacing, steps):
    from difflineage.diffusion.schedules import diffusers_timesteps

    for solver, cls in ((False, diffusers.DDIMScheduler), (True, diffusers.DPMSolverMultistepScheduler)):
        sched = cls(timestep_spacing=spacing, steps_offset=1)
        sched.set_timesteps(steps)
        assert diffusers_timesteps(1000, steps, spacing, 1, solver=solver) == sorted(sched.timesteps.tolist())


def test_command_line_samples_and_converts(tiny, tmp_path, capsys):
    """`difflineage sample sd:PATH` from the folder, `convert` to the single file and back, the single file sampled
    with its tokenizer given; the same image from each."""
    from PIL import Image

    from difflineage.cli import main

    version, folder, _ = tiny
    args = ["--caption", CAPTIONS[0], "--negative", CAPTIONS[3], "--steps", "3", "--seed", "5", "--size", "16"]
    assert main(["sample", f"sd:{folder}", *args, "--out", str(tmp_path / "a.png")]) == 0
    assert "Stable Diffusion" in capsys.readouterr().out
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(folder), str(single), "--to", "official"]) == 0
    assert main(["sample", f"sd:{single}", *args, "--out", str(tmp_path / "b.png"),
                 "--tokenizer", str(folder / "tokenizer")]) == 0
    assert main(["convert", str(single), str(tmp_path / "back"), "--to", "diffusers", "--tokenizer",
                 str(folder / "tokenizer")]) == 0
    assert main(["sample", f"sd:{tmp_path / 'back'}", *args, "--out", str(tmp_path / "c.png"), "--sampler",
                 "dpmpp_2m", "--fast"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")).astype(int) for x in "ab")
    assert a.shape == b.shape and a.shape[2] == 3 and np.abs(a - b).max() <= 1
    assert main(["sample", f"sd:{single}", "--caption", "x", "--out", str(tmp_path / "d.png")]) == 2  # no tokenizer
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["sample", f"sd:{folder}", "--out", str(tmp_path / "e.png")]) == 2
    assert "--caption" in capsys.readouterr().err


def test_demo_serves_a_released_model(tiny, tmp_path):
    from pathlib import Path

    from difflineage.demo import DemoRun, Request, count, draw

    _, folder, _ = tiny
    run = DemoRun(Path(f"sd:{folder}"))
    assert run.condition_kind == "caption" and run.diffusion and "Stable Diffusion" in run.describe()
    assert run.defaults()["steps"] == 50 and run.defaults()["guidance"] == 7.5
    heard = []
    result = count(run, draw(run, Request(condition=CAPTIONS[0], n=2, steps=2), tmp_path / "out",
                             progress=lambda f, what: heard.append(f)))
    assert result.drawn[0].images.shape == (2, 3, 16, 16) and heard

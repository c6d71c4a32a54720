"""The browser demo's functions (difflineage/demo/), without a browser: runs found and refused, requests in the
user's words, sampling a DiT and a DyDiT beside its base with counted FLOPs, the DyDiT pictures of one sample, the
family's controls on every system's tiny fixture, and bad requests as messages."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dit_system import tiny_dit_dict
from test_dydit import tiny_dydit_dict

import difflineage
from difflineage.checkpoint import latest_checkpoint
from difflineage.demo import (
    EVERY_CLASS,
    Demo,
    DemoError,
    DemoRun,
    Request,
    check_run,
    count,
    decode_latent,
    draw,
    find_runs,
    inspect_sample,
    message,
    summary,
)
from difflineage.eval.dydit_pictures import width_usage
from difflineage.eval.flops import count_flops
from difflineage.systems import config_from_dict
from difflineage.train import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "systems"


def tiny_runs(tmp_path_factory) -> Path:
    """runs/dit (a tiny pixel DiT, 4 heads) and runs/dydit (fine-tuned from it toward lambda 0.3), trained once per
    test session in one folder that this module and the browser test share."""
    root = tmp_path_factory.getbasetemp() / "demo-runs"
    if latest_checkpoint(root / "dydit") is None:
        d = tiny_dit_dict(steps=8)
        d["model"]["dit"].update(hidden=64, heads=4)
        Trainer(config_from_dict(d), root / "dit", progress=False, overwrite=True).fit()
        dy = tiny_dydit_dict(str(root / "dit"))
        dy["train"]["steps"] = 20
        Trainer(config_from_dict(dy), root / "dydit", progress=False, overwrite=True).fit()
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tiny_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def dit(runs):
    return DemoRun(runs / "dit")


@pytest.fixture(scope="module")
def dydit(runs):
    return DemoRun(runs / "dydit")


def test_runs_are_found_and_what_is_not_a_run_is_refused_by_name(runs, tmp_path):
    assert find_runs(runs) == [runs / "dit", runs / "dydit"]
    assert find_runs(tmp_path / "absent") == []
    assert check_run(runs / "dit") == latest_checkpoint(runs / "dit")
    (tmp_path / "notes").mkdir()
    with pytest.raises(DemoError, match="is not a checkpoint or run directory"):
        DemoRun(tmp_path / "notes")
    with pytest.raises(DemoError, match="no checkpoint at"):
        DemoRun(tmp_path / "typo")


def test_a_class_is_asked_for_in_the_users_words(dit):
    assert dit.condition_kind == "class" and dit.class_names[7] == "seven"
    assert dit.condition_of("seven", 3) == (7, ["seven"] * 3)
    assert dit.condition_of("Seven", 3)[0] == 7 and dit.condition_of("7", 3)[0] == 7
    labels, captions = dit.condition_of(EVERY_CLASS, 12)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and captions[:2] == ["zero", "one"]
    with pytest.raises(DemoError, match=r"unknown class 'sevn' \(did you mean 'seven'\?\); valid: zero, one"):
        dit.condition_of("sevn", 2)
    with pytest.raises(DemoError, match="reads as a caption, but this run .* is class-conditional: choose a class"):
        dit.condition_of("a handwritten digit seven", 2)
    with pytest.raises(DemoError, match="unknown class '12'"):
        dit.condition_of("12", 2)


def test_a_dit_request_draws_times_counts_and_writes_its_images(dit, tmp_path):
    request = Request(condition="three", n=5, seed=11, steps=4)
    heard = []
    result = draw(dit, request, tmp_path / "a", progress=lambda f, what: heard.append((f, what)))
    (d,) = result.drawn
    assert d.images.shape == (5, 1, 8, 8) and d.seconds > 0 and heard[0] == (0.0, "sampling DiT") and heard[-1][0] == 1
    assert [what for _, what in heard[1:-1]] == [f"sampling DiT: step {k} of 4" for k in (1, 2, 3, 4)]
    assert d.options == {"guidance": 2.0, "sampler": "ddim", "steps": 4}  # the run's own guidance and sampler
    # the same seed draws the same images, as an independent sample call does
    expected = dit.system.sample(5, condition=3, generator=torch.Generator().manual_seed(11), steps=4, sampler="ddim",
                                 guidance=2.0)
    assert torch.equal(d.images, expected)
    assert torch.equal(draw(dit, request, tmp_path / "b").drawn[0].images, d.images)
    npz = np.load(d.npz_file)
    assert npz["arr_0"].shape == (5, 8, 8, 3) and npz["arr_0"].dtype == np.uint8 and (npz["arr_1"] == 3).all()
    assert len(d.image_files) == 5 and all(f.stat().st_size > 0 for f in [*d.image_files, d.grid_file])
    assert d.macs is None and "counting" in summary(dit, result, 0)
    count(dit, result)
    # guided: one denoiser call per step on both halves, each the one-image forward that `info` counts
    one = count_flops(dit.system.forward_passes()["sampling: dit (one image, one step)"]).macs
    assert d.denoiser_calls == 4 and d.denoiser_macs == pytest.approx(2 * one)
    assert d.macs >= 4 * 2 * one
    text = summary(dit, result, 0)
    assert "s per image" in text and "FLOPs per image" in text and "ddim" in text


def test_a_random_seed_is_shown_and_draws_the_same_images_again(dit, tmp_path):
    first = draw(dit, Request(condition="one", n=2, randomize=True, steps=2), tmp_path / "r")
    again = draw(dit, Request(condition="one", n=2, seed=first.seed, steps=2), tmp_path / "s")
    assert first.randomized and torch.equal(first.drawn[0].images, again.drawn[0].images)


def test_a_dydit_is_drawn_beside_its_base_with_the_same_seed_and_settings(dydit, runs, tmp_path):
    assert [m.title for m in dydit.models] == ["DyDiT", "DiT (its base)"] and dydit.models[0].dynamic
    result = draw(dydit, Request(condition="seven", n=3, seed=4, steps=5, guidance=2.5), tmp_path)
    dy, base = result.drawn
    assert dy.options == base.options == {"guidance": 2.5, "sampler": "ddim", "steps": 5}
    alone = difflineage.load(runs / "dit").sample(3, condition=7, generator=torch.Generator().manual_seed(4), steps=5,
                                                  sampler="ddim", guidance=2.5)
    assert torch.allclose(base.images, alone, atol=1e-6)
    count(dydit, result)
    assert dy.denoiser_calls == base.denoiser_calls == 5 and dy.denoiser_macs < base.denoiser_macs
    # the counted ratio agrees with the one the trace implies through the model's own FLOPs formula (which leaves
    # out the routers' small arithmetic): the trace holds these very images' token decisions
    net, trace = dydit.system.net, dy.trace
    assert len(trace.timesteps) == 5 and trace.timesteps[0] > trace.timesteps[-1] == 0
    implied = []
    for i, t in enumerate(trace.timesteps):
        heads, groups = width_usage(net, torch.tensor([t]))
        tokens = torch.stack([x.float().mean(1) for x in trace.decisions[i]], 1)  # (both guidance halves, depth)
        units = net.blocks[0].heads
        implied.append(net.flops_ratio({"heads": (heads[:, 0] / units).expand_as(tokens),
                                        "groups": (groups[:, 0] / units).expand_as(tokens), "tokens": tokens}).mean())
    assert dy.denoiser_macs / base.denoiser_macs == pytest.approx(torch.stack(implied).mean().item(), rel=0.05)
    assert "of the DiT's FLOPs" in summary(dydit, result, 0)
    width, tokens = inspect_sample(dydit, result, 2, tmp_path)
    assert width.stat().st_size > 1000 and tokens.stat().st_size > 1000
    with pytest.raises(DemoError, match="choose one of 0..2"):
        inspect_sample(dydit, result, 3, tmp_path)


def test_the_fast_path_says_what_it_chose(dit, tmp_path, monkeypatch):
    monkeypatch.setattr(type(dit.system), "compile_blocks", lambda self: False)  # compiling is tested in test_step_cache
    result = draw(dit, Request(condition="two", n=2, seed=1, fast=True), tmp_path)
    d = result.drawn[0]
    assert d.options["sampler"] == "dpmpp_2m" and d.options["steps"] == 20 and "step_cache" in d.options
    assert "step cache reusing" in d.said
    count(dit, result)
    assert d.denoiser_calls == 20


@pytest.mark.parametrize("request_, match", [
    (Request(n=0), "number of images 0 must lie in 1..64"),
    (Request(n=65), "must lie in 1..64"),
    (Request(steps=0), "steps 0 must lie in 1..100"),
    (Request(steps=101), "this run's chain has 100 timesteps"),
    (Request(sampler="euler"), "unknown sampler 'euler'; valid: ddpm, ddim, dpmpp_2m"),
    (Request(guidance=-1), "guidance -1 must lie in 0..50"),
    (Request(rerank=4), "cannot rerank: that needs a DALL-E prior that carries a CLIP"),
    (Request(seed=-3), "seed -3 must lie in"),
    (Request(seed="x"), "seed 'x' must be a whole number"),
])
def test_bad_requests_are_refused_with_what_to_do(dit, tmp_path, request_, match):
    with pytest.raises(DemoError, match=match) as info:
        draw(dit, request_, tmp_path)
    assert message(info.value).startswith("**Error:** ")


def test_an_unexpected_failure_is_a_message_not_a_traceback(capsys):
    try:
        raise KeyError("boom")
    except KeyError as exc:
        text = message(exc)
    assert text.startswith("**Error:** KeyError") and "Traceback" not in text
    assert "Traceback" in capsys.readouterr().err  # the server's log keeps it


def test_every_family_gets_its_controls_and_draws(tmp_path):
    vae = DemoRun(FIXTURES / "vae")  # a 2-D latent, unconditional
    assert vae.latent_2d and not vae.diffusion and vae.takes_temperature and vae.condition_kind == "none"
    image = decode_latent(vae, 0.5, -1.0)
    expected = vae.system.vae.mean_image(vae.system.vae.decode(torch.tensor([[0.5, -1.0]]), None))
    scale = image.shape[0] // 8
    assert image.shape == (8 * scale, 8 * scale, 1)
    pixels = ((expected.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(image[::scale, ::scale], pixels)
    assert draw(vae, Request(n=2, temperature=0.5), tmp_path / "vae").drawn[0].images.shape[0] == 2
    with pytest.raises(DemoError, match="is unconditional: it takes no class or caption, and 'four' was given"):
        draw(vae, Request(condition="four", n=2), tmp_path / "vae")

    prior = DemoRun(FIXTURES / "vqvae_prior")
    assert prior.takes_temperature and not prior.takes_guidance and not prior.latent_2d and not prior.can_rerank
    with pytest.raises(DemoError, match="latent plane is for a VAE with a 2-D latent"):
        decode_latent(prior, 0, 0)
    assert draw(prior, Request(n=2, temperature=0.7), tmp_path / "vq").drawn[0].options == {"temperature": 0.7}

    dalle = DemoRun(FIXTURES / "dalle_prior")
    assert dalle.condition_kind == "caption" and dalle.can_rerank and dalle.takes_guidance and dalle.takes_temperature
    result = draw(dalle, Request(condition="a handwritten digit two", n=2, rerank=2, temperature=0.9), tmp_path / "d")
    guidance = dalle.system.config.model.guidance  # left out: the run's own
    assert result.drawn[0].options == {"guidance": guidance, "temperature": 0.9, "rerank": 2}
    assert result.captions == ["a handwritten digit two"] * 2
    with pytest.raises(DemoError, match="give a caption: this run is caption-conditioned"):
        draw(dalle, Request(condition=" ", n=1), tmp_path / "d")

    ddpm = DemoRun(FIXTURES / "ddpm_caption")
    assert ddpm.diffusion and ddpm.condition_kind == "caption" and ddpm.takes_guidance
    count(ddpm, result := draw(ddpm, Request(condition="a handwritten digit one", n=2, steps=2), tmp_path / "p"))
    assert result.drawn[0].denoiser_calls == 2 and result.drawn[0].macs > 0


def test_each_run_offers_example_settings_for_the_controls_it_shows(dit):
    from difflineage.demo.runs import PRESET_OWN

    presets = dit.presets()
    d = dit.defaults()
    assert list(presets)[0] == PRESET_OWN and presets[PRESET_OWN]["steps"] == d["steps"]
    assert presets["few steps: DPM-Solver++, 10 steps"] == {"sampler": "dpmpp_2m", "steps": 10, "fast": False}
    assert presets["fastest: the fast path"]["fast"] and "strong guidance (5): more typical, less varied" in presets
    assert not any("temperature" in p or "rerank" in p for p in presets.values() if p is not presets[PRESET_OWN])
    vae, dalle = DemoRun(FIXTURES / "vae"), DemoRun(FIXTURES / "dalle_prior")
    assert list(vae.presets()) == [PRESET_OWN]  # a 2-D latent has its plane instead
    assert dalle.presets()["best of 8 (CLIP reranks 8 candidates per image)"] == {"rerank": 8}
    assert not any("steps" in p for p in dalle.presets().values())


def test_the_command_refuses_what_it_cannot_serve(tmp_path, capsys):
    from difflineage.cli import main

    assert main(["demo", "--runs-dir", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main(["demo", str(tmp_path)]) == 2
    assert "is not a checkpoint or run directory" in capsys.readouterr().err


def test_the_demos_own_image_folder_is_removed_and_a_given_one_kept(tmp_path):
    own = Demo([])
    assert own.out_root.is_dir()
    (own.out_root / "request-00001").mkdir()
    own.close()
    assert not own.out_root.exists()
    given = Demo([], out_root=tmp_path / "images")
    given.out_root.mkdir()
    given.close()
    assert given.out_root.is_dir()


def test_the_run_box_loads_only_the_runs_it_was_started_with_and_never_echoes_a_file(runs, tmp_path, capsys):
    demo = Demo([runs / "dit"])
    assert demo.run(str(runs / "dit")).system.config.system == "dit"
    assert demo.run(str(latest_checkpoint(runs / "dit"))).system is not None  # beneath a run it serves
    with pytest.raises(DemoError, match="is not a run this demo serves, nor beneath one.*--any-run"):
        demo.run(str(runs / "dydit"))
    with pytest.raises(DemoError, match="is not a run this demo serves"):
        demo.run(str(runs / "dit" / ".." / "dydit"))  # a path that only looks beneath it
    # a run whose config.yaml cannot be read: the page names the run and the kind of error, the log says why
    broken = tmp_path / "broken"
    shutil.copytree(latest_checkpoint(runs / "dit"), broken / "checkpoints" / "step_0000001")
    secret = "system: dit\nmodel: {a: [1, 2\n# a line only the server may show\n"
    (broken / "checkpoints" / "step_0000001" / "config.yaml").write_text(secret)
    (broken / "checkpoints" / "step_0000001" / "checksums.sha256").unlink()  # so that the YAML itself is read
    opened = Demo([runs / "dit"], any_run=True)
    assert opened.run(str(runs / "dydit")).system.config.system == "dydit"
    with pytest.raises(DemoError) as info:
        opened.run(str(broken))
    assert "could not be loaded (CheckpointError)" in str(info.value)
    assert "a line only the server may show" not in str(info.value) and "model:" not in str(info.value)
    assert "config.yaml" in capsys.readouterr().err


def test_the_caption_box_suggests_the_data_s_captions_and_notes_unknown_words(tmp_path):
    dalle = DemoRun(FIXTURES / "dalle_prior")
    suggestions = dalle.caption_suggestions
    assert "a handwritten digit two" in suggestions and len(suggestions) == len(set(suggestions))
    assert dalle.caption_note("a handwritten digit two") == ""
    note = dalle.caption_note("a handwritten zebra, striped")
    assert "'zebra', 'striped' never occur in the captions this run was trained on" in note
    result = draw(dalle, Request(condition="a handwritten zebra", n=1), tmp_path / "d")  # free text: drawn, with a note
    assert result.drawn[0].images.shape[0] == 1 and "'zebra' never occurs" in result.note
    assert draw(dalle, Request(condition="a handwritten digit two", n=1), tmp_path / "e").note == ""


def test_a_run_on_the_data_s_own_captions_suggests_held_out_ones_first(tmp_path):
    from test_own_data import make_shapes

    from difflineage.data import load_dataset
    from difflineage.train.recipes import fit_recipe

    folder = make_shapes(tmp_path / "captioned", size=8, per_class=10, captions="metadata.jsonl")
    fitted = fit_recipe("ddpm-mnist", f"folder:{folder}", ["train.steps=1", "train.sample_n=2",
                                                           "model.diffusion.sample_steps=2"])
    Trainer(fitted.config, tmp_path / "run", progress=False).fit()
    run = DemoRun(tmp_path / "run")
    held = load_dataset(run.system.config.data, "heldout").captions
    assert held and run.caption_suggestions[: len(held)] == list(dict.fromkeys(held))
    assert run.defaults()["condition"] == held[0] and "a blue circle" in run.caption_suggestions
    assert "'green' never occurs" in run.caption_note("a green circle") and run.caption_note("a red square") == ""

"""Stable Diffusion on the CPU: difflineage's pipeline against diffusers' on the same weights, one image, side by side.

    python benchmarks/bench_sd.py [--size 512] [--model runs/sd15-random] [--only "CASE" ...]

The weights are random at Stable Diffusion 1.5's size (UNet 860M, CLIP ViT-L/14 text tower, the f8 VAE; nothing is
downloaded), written once as a diffusers folder that both pipelines load; the tokenizer is a small CLIP-style BPE
vocabulary made here (the released one is not shipped), which changes the ids, not the work. Each case runs in a
process of its own (its peak memory is its own): it loads the model, draws a 2-step warm-up image, then one timed
image from the same initial latents and caption, guidance 7.5:

* ``diffusers default``: ``StableDiffusionPipeline`` as it comes: PNDM, 50 steps, fp32;
* ``diffusers DPM-Solver++ 20``: the same sampler, steps and precision as ours;
* ``diffusers DPM-Solver++ 20, channels-last``: what diffusers gains from the layout ours uses (not its default);
* ``difflineage DPM-Solver++ 20``: ours, fp32 (channels-last on the CPU);
* ``difflineage DPM-Solver++ 20, compiled``: the same with the UNet under ``torch.compile`` (compiled during the
  warm-up, whose time is given apart);
* ``difflineage --fast``: DPM-Solver++ 20, the UNet's feature cache (deep levels every third step), bf16 where native;
* ``diffusers DPM-Solver++ 20, bf16`` and ``difflineage DPM-Solver++ 20, bf16``: both with bf16 weights (diffusers'
  ``torch_dtype``, our ``dtype``), the same sampler and steps: measured only on a CPU with native bf16.

Then how far each image is from ``diffusers DPM-Solver++ 20`` (pixels in [0, 1]), and, on a tiny configuration with
random weights, how far ``--fast`` moves the image from the plain path over several seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from harness import REPO, Peak, record

from difflineage.machine import machine_description
from difflineage.nn.precision import native_bf16

CAPTION = "a photograph of an astronaut riding a horse on the moon, highly detailed"
CASES = {
    "diffusers default": {"who": "diffusers", "scheduler": "PNDMScheduler", "steps": 50},
    "diffusers DPM-Solver++ 20": {"who": "diffusers", "scheduler": "DPMSolverMultistepScheduler", "steps": 20},
    "diffusers DPM-Solver++ 20, channels-last": {"who": "diffusers", "scheduler": "DPMSolverMultistepScheduler",
                                                 "steps": 20, "channels_last": True},
    "difflineage DPM-Solver++ 20": {"who": "ours", "sampler": "dpmpp_2m", "steps": 20},
    "difflineage DPM-Solver++ 20, compiled": {"who": "ours", "sampler": "dpmpp_2m", "steps": 20, "compile": True},
    "difflineage --fast": {"who": "ours", "fast": True},
    # both pipelines with bf16 weights (diffusers' torch_dtype, our dtype=): measured only where bf16 is native
    "diffusers DPM-Solver++ 20, bf16": {"who": "diffusers", "scheduler": "DPMSolverMultistepScheduler", "steps": 20,
                                        "dtype": "bf16"},
    "difflineage DPM-Solver++ 20, bf16": {"who": "ours", "sampler": "dpmpp_2m", "steps": 20, "dtype": "bf16"},
}
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=4, sample_size=512)
VIT_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
VOCAB_TEXT = [CAPTION, "a red apple on a wooden table", "thumbs up: medium-dark skin tone", "flag: Japan",
              "woman office worker", "the quick brown fox jumps over the lazy dog"]


def make_vocab(folder: Path) -> Path:
    """A byte-level BPE vocabulary with CLIP's conventions, trained on a few captions (vocab.json, merges.txt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=alphabet + [a + "</w>" for a in alphabet],
                                  end_of_word_suffix="</w>", show_progress=False,
                                  special_tokens=["!", "<|startoftext|>", "<|endoftext|>"])
    tok.train_from_iterator([c.lower() for c in VOCAB_TEXT] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>", "model_max_length": 77}))
    return folder


def make_pipeline(folder: Path, unet: dict, vae: dict, text: dict, seed: int = 0) -> Path:
    """Random weights in a diffusers Stable Diffusion folder (made once; reused when complete)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_vocab(folder / "tokenizer")))
    cfg = transformers.CLIPTextConfig(**text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**vae), text_encoder=transformers.CLIPTextModel(cfg), tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**unet), scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():  # a random UNet's zero-initialised output layers would make every image the same
        for p in pipe.unet.conv_out.parameters():
            p.normal_(0, 0.02)
    pipe.save_pretrained(str(folder))
    return folder


def run_case(name: str, folder: Path, size: int, out: Path) -> dict:
    """One case in this process: load, warm up (2 steps), then one timed image. Writes the image as .npy."""
    case = CASES[name]
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    dtype = torch.bfloat16 if case.get("dtype") == "bf16" else torch.float32
    t0 = time.perf_counter()
    if case["who"] == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                                 requires_safety_checker=False, torch_dtype=dtype)
        pipe.scheduler = getattr(diffusers, case["scheduler"]).from_config(
            diffusers.PNDMScheduler.load_config(str(folder), subfolder="scheduler"))
        pipe.set_progress_bar_config(disable=True)
        if case.get("channels_last"):
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)

        def draw(steps):
            with torch.no_grad():
                return pipe(CAPTION, num_inference_steps=steps, guidance_scale=7.5, latents=latents.to(dtype),
                            height=size, width=size, output_type="pt").images
    else:
        from difflineage.systems.stable_diffusion import StableDiffusion

        model = StableDiffusion.from_pretrained(folder, dtype=dtype)

        def draw(steps):
            return (model.sample(CAPTION, latents=latents, guidance=7.5, progress=False, fast=case.get("fast", False),
                                 sampler=case.get("sampler"), steps=steps, compile=case.get("compile", False)) + 1) / 2
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    draw(2)
    warm = time.perf_counter() - t0
    with Peak(torch.device("cpu")) as peak:
        start = time.perf_counter()
        image = draw(case.get("steps"))
        seconds = time.perf_counter() - start
    np.save(out / f"{name}.npy", image.float().numpy())
    return {"case": name, "seconds": seconds, "load_s": loaded, "warm_up_s": warm, "peak_mib": peak.mib}


def tiny_fast_distance(root: Path, seeds: int = 8) -> dict:
    """On a tiny random SD (UNet 32/64/64, 32 px): mean and worst pixel distance of --fast from the plain path."""
    from difflineage.systems.stable_diffusion import StableDiffusion

    unet = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                attention_head_dim=8)
    vae = dict(SD15_VAE, block_out_channels=(32, 32, 64, 64), sample_size=32)
    text = dict(VIT_L_TEXT, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1)
    folder = make_pipeline(root / "sd-tiny-random", unet, vae, text)
    model = StableDiffusion.from_pretrained(folder)
    mean, worst = [], 0.0
    for s in range(seeds):
        latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(s))
        plain = model.sample(CAPTION, latents=latents, sampler="dpmpp_2m", steps=20, progress=False)
        fast = model.sample(CAPTION, latents=latents, fast=True, progress=False)
        d = ((fast - plain).abs() / 2)  # pixels in [0, 1]
        mean.append(d.mean().item())
        worst = max(worst, d.max().item())
    return {"seeds": seeds, "mean_abs": float(np.mean(mean)), "max_abs": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "sd15-random")
    ap.add_argument("--only", nargs="*", default=None, metavar="CASE",
                    help="case names to (re)measure, each quoted (default: all); the table keeps the other cases' last "
                         "measurements at this size on this machine (--only alone: the table rebuilt from them)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.size, args.out)))
        return
    folder = make_pipeline(args.model, SD15_UNET, SD15_VAE, VIT_L_TEXT)
    out = args.model / "images"
    out.mkdir(exist_ok=True)
    unknown = [n for n in args.only or () if n not in CASES]
    if unknown:
        raise SystemExit(f"--only: no case {unknown[0]!r}; the cases are: " + "; ".join(CASES))
    names = [n for n in CASES if args.only is None or n in args.only]
    if not native_bf16(torch.device("cpu")):
        names = [n for n in names if CASES[n].get("dtype") != "bf16"]
        print("this CPU has no native bf16: the bf16 cases are left out", file=sys.stderr)
    kept = out / f"rows-{args.size}.json"  # each case's row as measured: a rerun of some cases keeps the others'
    machine = machine_description()  # (measured on this machine: rows of another are not mixed into its table)
    measured = {k: v for k, v in (json.loads(kept.read_text()) if kept.is_file() else {}).items()
                if v.get("machine") == machine}
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--case", name, "--model", str(folder), "--size",
                               str(args.size), "--out", str(out)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        measured[name] = {**row, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine}
        kept.write_text(json.dumps(measured, indent=2))
        print(f"  {row['seconds']:.1f} s, peak {row['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    rows = [measured[n] for n in CASES if n in measured]
    seconds = {r["case"]: r["seconds"] for r in rows}
    ref = "diffusers DPM-Solver++ 20"
    ref_image = np.load(out / f"{ref}.npy") if (out / f"{ref}.npy").is_file() else None
    table = []
    for r in rows:
        case = CASES[r["case"]]
        image = np.load(out / f"{r['case']}.npy")
        # the same-sampler ratio for the DPM-Solver++ 20 rows only (PNDM and --fast are compared to diffusers' default)
        same = ref + (", bf16" if case.get("dtype") == "bf16" else "")
        same_sampler = case.get("scheduler", case.get("sampler")) in ("DPMSolverMultistepScheduler", "dpmpp_2m")
        table.append({
            "pipeline": r["case"], "sampler": case.get("scheduler", case.get("sampler", "dpmpp_2m (fast)")),
            "steps": case.get("steps", 20), "s/image": round(r["seconds"], 1),
            "speed-up vs diffusers default": round(seconds["diffusers default"] / r["seconds"], 2)
            if "diffusers default" in seconds else None,
            "speed-up vs diffusers, same sampler and precision": round(seconds[same] / r["seconds"], 2)
            if same_sampler and same in seconds else None,
            "peak memory (MiB)": round(r["peak_mib"]),
            "2-step warm-up (s)": round(r["warm_up_s"], 1) if "warm_up_s" in r else None,
            f"max |image - {ref}|": round(float(np.abs(image - ref_image).max()), 4) if ref_image is not None else None,
        })
    tiny = tiny_fast_distance(args.model.parent)
    notes = (f"One {args.size}x{args.size} image, guidance 7.5, random weights at Stable Diffusion 1.5's size, each "
             "case in its own process after a 2-step warm-up (loading not timed). Peak memory is the process's peak "
             f"RSS over the timed image. Images in [0, 1]. On a tiny random configuration, --fast's images differ from "
             f"the plain DPM-Solver++ 20 ones by {tiny['mean_abs']:.4f} on average per pixel (worst pixel "
             f"{tiny['max_abs']:.3f}) over {tiny['seeds']} seeds.")
    record("stable_diffusion_cpu", "Stable Diffusion 1.5 on the CPU: difflineage against diffusers", table, notes,
           command=f"python benchmarks/bench_sd.py --size {args.size}")


if __name__ == "__main__":
    main()

"""The GPU suite: DiT and DyDiT training and sampling throughput on one machine, in one command.

    bash benchmarks/gpu_suite.sh                         # CUDA: DiT-XL/2 and DiT-B/2 at 256 px (32x32x4 latents)
    bash benchmarks/gpu_suite.sh --tiny --device cpu --no-compile --out /tmp/suite   # a 2-layer DiT, in seconds

Four tables, each from the code paths a user runs (nothing here is specific to the CPU or to CUDA):

1. ``trainer``: the recipe (configs/dit-xl2-imagenet256.yaml, dit-b2-imagenet256.yaml) trained by the project's
   Trainer from a latent store of random latents (written with the store writer ``difflineage extract`` uses;
   1000 classes, a first stage of random weights saved as an SD VAE file), with ``train.bf16=true`` and
   ``train.compile=true``. Steps/s and images/s are the Trainer's own ``images_per_s`` (metrics.jsonl) over the log
   windows after the first (warm-up, compilation); peak memory is ``torch.cuda.max_memory_allocated`` over the run
   on CUDA, the process's peak RSS (VmHWM, reset before the run) on the CPU. Drawing sample grids and writing
   checkpoints are left out of the run (their time is not training throughput; an XL checkpoint is ~11 GB).
2. ``vs_diffusers``: the same model's training step (forward, backward, AdamW; bf16 autocast) against diffusers'
   DiTTransformer2DModel holding the same weights (benchmarks/bench_dit_speed.py's ``build_pair`` and
   ``train_fn``), compiled for both, interleaved; the same-weights check is the max |ours - diffusers| of an fp32
   forward pass on the same inputs.
3. ``dydit``: DyDiT's fast path against its masked path (the released code's way) and DiT, at router densities
   whose counted FLOPs ratio is about lambda = 0.5 (benchmarks/bench_dydit_speed.py's ``build`` and
   ``set_density``), forward passes at batch 32 under bf16 autocast.
4. ``sampling``: images/s of ``system.sample`` (the DDPM sampler with the recipe's 250 steps and guidance 1.5,
   first-stage decoding included, bf16 autocast) for DiT and, at one of those densities, DyDiT's fast and masked
   paths.

Writes ``benchmarks/results/gpu_suite.json`` and the ``gpu_suite`` section of docs/benchmarks.md (with ``--out DIR``:
``DIR/gpu_suite.json`` and ``DIR/gpu_suite.md``), headed with the machine: the GPU's name, or the CPU's model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

# benchmarks/ is not a package: run as a script, this file's folder is on sys.path, so its neighbours import
from bench_dit_speed import build_pair, forward_fn, train_fn
from bench_dydit_speed import build as build_dydit_pair
from bench_dydit_speed import set_density
from harness import DOCS, RESULTS, Peak, markdown_table, one_at_a_time, side_by_side, write_section

from difflineage.data.store import FORMAT, ShardWriter, finish_store, normalise_source
from difflineage.eval.flops import count_flops
from difflineage.interop.sd_vae import load_sd_vae, save_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.models.dit import DiTConfig
from difflineage.systems import build_system, load_config, system_for
from difflineage.train.trainer import Trainer, TrainingRun, compile_for_training
from difflineage.weights import state_digest

RECIPES = {"DiT-XL/2": "dit-xl2-imagenet256", "DiT-B/2": "dit-b2-imagenet256", "DiT-S/2": "dit-s2-imagenet256"}
DYDIT_RECIPE = "dydit-xl2-imagenet256"
TINY = "tiny (custom: depth 2, hidden 64, 4 heads, patch 2)"


# ------------------------------------------------------------------------------------------------
# The machine and its memory
# ------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


_T0 = time.perf_counter()


def say(what: str) -> None:
    print(f"[gpu suite {time.perf_counter() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# A first stage and a store of random latents
# ------------------------------------------------------------------------------------------------


def first_stage_config(tiny: bool) -> AutoencoderKLConfig:
    """The SD VAE's architecture (f = 8, 4 latent channels), or a narrow one with the same downsampling."""
    if tiny:
        return AutoencoderKLConfig(channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_groups=4)
    return AutoencoderKLConfig(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_groups=32)


def make_first_stage(root: Path, tiny: bool) -> tuple[str, int]:
    """An SD VAE file of random weights under ``root``; returns (model.first_stage spec, GroupNorm groups)."""
    cfg = first_stage_config(tiny)
    torch.manual_seed(0)
    path = save_sd_vae(AutoencoderKL(cfg, image_channels=3), root / "vae.safetensors")
    return f"sd-vae:{path}", cfg.norm_groups


def make_store(root: Path, spec: str, norm_groups: int, source: str, image_size: int, latent_side: int,
               count: int, classes: int = 1000, shard_size: int = 256) -> Path:
    """A latent store of ``count`` random Gaussian moments (both orientations), random labels of ``classes``
    classes, written as ``difflineage extract`` writes one (a ShardWriter per shard, then finish_store)."""
    root.mkdir(parents=True, exist_ok=True)
    vae = load_sd_vae(spec.split(":", 1)[1], norm_groups=norm_groups)  # the digest the trainer will check
    g = np.random.default_rng(0)
    shape = [2, 4, latent_side, latent_side]
    shards = math.ceil(count / shard_size)
    arrays = {"mean": {"dtype": "fp16", "shape": shape}, "std": {"dtype": "fp16", "shape": shape}}
    for k in range(shards):
        n = min(shard_size, count - k * shard_size)
        mean = torch.from_numpy(g.standard_normal((n, *shape), dtype=np.float32) * 5.0)
        std = torch.from_numpy(g.uniform(0.05, 0.5, (n, *shape)).astype(np.float32))
        with ShardWriter(root, k, arrays) as shard:
            shard.add({"mean": mean, "std": std}, labels=g.integers(0, classes, n))
            shard.commit()
    meta = {"format": FORMAT, "kind": "gaussian",
            "first_stage": {"spec": spec, "digest": state_digest(vae.state_dict())},
            "data": {"source": normalise_source(source), "image_size": image_size, "channels": 3, "split": "train",
                     "count": count, "class_names": [f"class {i}" for i in range(classes)]},
            "arrays": arrays, "shard_size": shard_size, "count": count}
    finish_store(root, meta, shards)
    return root


# ------------------------------------------------------------------------------------------------
# The rows
# ------------------------------------------------------------------------------------------------


def recipe_overrides(args, name: str) -> list[str]:
    """--set style overrides naming the DiT size (``name``), or shrinking it to the tiny model."""
    if not args.tiny:
        return [f"model.dit.name={name}"]
    return ["model.dit.name=custom", "model.dit.depth=2", "model.dit.hidden=64", "model.dit.heads=4",
            "model.dit.patch=2"]


def label(args, name: str, dydit: bool = False) -> str:
    """A row's model: the DiT size (DyDiT's: DyDiT-XL/2), marked when the tiny model stands in for it."""
    name = name.replace("DiT", "DyDiT", 1) if dydit else name
    return f"{name} (tiny)" if args.tiny else name


def dit_config(args, name: str) -> DiTConfig | str:
    return DiTConfig(name="custom", depth=2, hidden=64, heads=4, patch=2) if args.tiny else name


def train_with_trainer(args, name: str, spec: str, norm_groups: int, store: Path, source: str, work: Path,
                       device: torch.device):
    """Row 1: the recipe trained by the Trainer from the store; returns (row, the trained EMA system)."""
    steps = args.warmup + args.steps
    sets = [f"data.source={source}", f"data.latents={store}", f"data.image_size={args.image_size}",
            f"model.first_stage={spec}", f"model.sd_vae_norm_groups={norm_groups}",
            f"train.batch_size={args.batch}", f"train.steps={steps}", f"train.log_every={args.log_every}",
            "train.bf16=true", f"train.compile={'false' if args.no_compile else 'true'}",
            f"train.device={device.type}", "train.sample_every=0", "train.checkpoint_every=0", "train.sample_n=1",
            *recipe_overrides(args, name)]
    config = load_config(RECIPES.get(name, "dit-xl2-imagenet256"), sets)
    run_dir = work / f"run-{name.replace('/', '-')}"
    trainer = Trainer(config, run_dir, progress=False, overwrite=True)
    _free(device)
    torch._dynamo.reset()  # a fresh compiler cache per model: static shapes, no recompilation limit reached
    # sample grids and checkpoints are not training throughput (and an XL checkpoint is ~11 GB): left out
    with mock.patch.object(TrainingRun, "draw", lambda self, step: None), \
            mock.patch.object(TrainingRun, "checkpoint", lambda self: None), \
            Peak(device) as peak:
        start = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - start
    if result.step != steps:
        raise RuntimeError(f"{name}: the trainer stopped at step {result.step} of {steps} ({result.status})")
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in logs if r["step"] > args.warmup]
    if not timed:
        raise RuntimeError(f"{name}: no log window after the {args.warmup} warm-up steps")
    seconds = sum(args.log_every * args.batch / r["images_per_s"] for r in timed)
    images = len(timed) * args.log_every * args.batch
    tc = trainer.config.train
    sync = "deferred" if tc.sync == "deferred" or (tc.sync == "auto" and device.type == "cuda") else "step"
    row = {"config": label(args, name), "recipe": RECIPES.get(name, "dit-xl2-imagenet256"),
           "batch": args.batch, "compiled": tc.compile, "bf16": tc.bf16, "sync": sync,
           "steps timed": len(timed) * args.log_every,
           "steps/s": images / args.batch / seconds, "images/s": images / seconds,
           "peak memory (MiB)": peak.mib, "resident before the run (MiB)": peak.resident_mib,
           "memory measure": peak.how,
           "final loss": timed[-1]["loss"], "run wall time incl. warm-up (s)": wall}
    ema_system = trainer.ema.module
    del trainer
    return row, ema_system


@contextlib.contextmanager
def _fp32_exactly():
    """fp32 matrix products and convolutions without TF32 (cuDNN allows it by default) for the weights check."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def train_vs_diffusers(args, name: str, device: torch.device) -> tuple[list[dict], dict]:
    """Row 2: our training step against diffusers' with the same weights; and the same-weights check."""
    ours, theirs = build_pair(dit_config(args, name), args.latent_side, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent_side, args.latent_side, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    with _fp32_exactly():
        reference = forward_fn(theirs, True, x, t, y, False)().float()
        diff = (forward_fn(ours, False, x, t, y, False)().float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    tolerance = 1e-3 * max(scale, 1.0)
    check = {"config": label(args, name), "max |ours - diffusers| (fp32 forward)": diff, "max |output|": scale,
             "tolerance": tolerance, "passed": bool(diff <= tolerance)}
    compiled = not args.no_compile
    mode = "bf16 + compile" if compiled else "bf16"
    candidates = {f"ours ({mode}, fused AdamW)": (ours, False, True),
                  f"diffusers ({mode}, fused AdamW)": (theirs, True, True),
                  "diffusers (bf16, eager, torch's default AdamW)": (theirs, True, False)}
    torch._dynamo.reset()

    def build(model, is_diffusers: bool, fused: bool, key: str):
        run, copy_ = train_fn(model, is_diffusers, x, t, y, True, fused_adamw=fused)
        if compiled and "eager" not in key:
            if is_diffusers:
                copy_.compile(dynamic=False)
            else:
                compile_for_training(copy_, device)
        return run

    # one training copy (weights, gradients, AdamW state: ~11 GB at XL/2) alive at a time
    timing, peaks = one_at_a_time({key: (lambda c=c, key=key: build(*c, key)) for key, c in candidates.items()}, device,
                                  warmup=max(1, args.bench_warmup), repeats=args.repeats)
    base = timing[f"diffusers ({mode}, fused AdamW)"].median_s
    rows = []
    for key in candidates:
        s = timing[key].median_s
        rows.append({"config": label(args, name), "batch": args.batch, "candidate": key, "step (ms)": s * 1e3,
                     "steps/s": 1 / s, "images/s": args.batch / s, "speed vs diffusers": f"{base / s:.2f}x",
                     "step peak memory (MiB)": peaks[key].mib, "memory measure": peaks[key].how})
    del ours, theirs
    _free(device)
    return rows, check


def dydit_rows(args, name: str, device: torch.device) -> tuple[list[dict], tuple]:
    """Row 3: DyDiT fast vs masked vs DiT forward passes at lambda-0.5 densities; returns the rows and the
    (DiT, DyDiT) pair for sampling."""
    dit, dy = build_dydit_pair(dit_config(args, name), args.latent_side, device)
    batch = args.dydit_batch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, args.latent_side, args.latent_side, generator=g).to(device)
    t = torch.full((batch,), 500, device=device)  # one timestep for the batch, as in a sampler step
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    base_macs = count_flops(lambda: dit(x, t, y)).macs

    def fn(model, **kw):
        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return model(x, t, y, **kw)
        return run

    rows = []
    for density in args.densities:
        w, k = (float(v) for v in density.split(","))
        set_density(dy, w, k, x, t, y)
        ratio = count_flops(lambda: dy(x, t, y, mode="fast")).macs / base_macs
        diff = (fn(dy, mode="fast")().float() - fn(dy, mode="masked")().float()).abs().max().item()
        cases = {"DiT": fn(dit), "fast": fn(dy, mode="fast"), "masked": fn(dy, mode="masked")}
        tm = side_by_side(cases, warmup=args.bench_warmup, repeats=args.repeats)
        row = {"config": label(args, name, dydit=True), "batch": batch,
               "precision": "bf16", "density (width, tokens)": density, "FLOPs ratio (counted)": ratio}
        for key, what in (("DiT", "DiT"), ("fast", "DyDiT fast"), ("masked", "DyDiT masked")):
            row[f"{what} (ms)"] = tm[key].median_s * 1e3
            row[f"{what} images/s"] = batch / tm[key].median_s
        row["fast speed-up vs DiT"] = f"{tm['DiT'].median_s / tm['fast'].median_s:.2f}x"
        row["fast speed-up vs masked"] = f"{tm['masked'].median_s / tm['fast'].median_s:.2f}x"
        row["max |fast - masked|"] = diff
        rows.append(row)
    return rows, (dit, dy)


def sampling_rows(args, name: str, dit_system, pair, device: torch.device) -> list[dict]:
    """Row 4: images/s of system.sample for DiT and (given the DyDiT pair) DyDiT's fast and masked paths."""
    cases = {"DiT": (dit_system, {})}
    density = None
    if pair is not None:
        dit, dy = pair
        dit_system = copy.deepcopy(dit_system)
        dit_system.net.load_state_dict(dit.state_dict())  # the DiT the DyDiT was made from
        density = args.densities[-1]
        w, k = (float(v) for v in density.split(","))
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2 * args.sample_n, 4, args.latent_side, args.latent_side, generator=g).to(device)
        tt = torch.full((len(x),), 500, device=device)
        yy = torch.randint(0, 1000, (len(x),), generator=g).to(device)
        set_density(dy, w, k, x, tt, yy)  # calibrated on a guided batch (twice the images)
        dysys = dydit_system(args, dit_system)
        dysys.net.load_state_dict(dy.state_dict())
        cases = {"DiT": (dit_system, {}), "DyDiT fast": (dysys, {"mode": "fast"}),
                 "DyDiT masked": (dysys, {"mode": "masked"})}
    labels = torch.arange(args.sample_n) % 1000
    opts = {"steps": args.sample_steps, "guidance": args.guidance, "sampler": "ddpm"}

    def fn(system, extra, steps=None):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return system.sample(args.sample_n, condition=labels, generator=torch.Generator().manual_seed(0),
                                     **{**opts, "steps": steps or opts["steps"]}, **extra)
        return run

    peaks = {}
    for key, (system, extra) in cases.items():
        system.eval()
        fn(system, extra, steps=2)()  # warm-up: kernels, the respaced chains' first use
        with Peak(device, above_resident=True) as peak:
            fn(system, extra, steps=2)()
        peaks[key] = peak
    runs = {key: fn(system, extra) for key, (system, extra) in cases.items()}
    tm = side_by_side(runs, warmup=0, repeats=args.sample_repeats)
    rows = []
    for key in cases:
        s = tm[key].median_s
        rows.append({"config": label(args, name, dydit=key != "DiT"), "model": key,
                     "density (width, tokens)": density if key != "DiT" else "",
                     "images": args.sample_n, "sampler": f"DDPM {args.sample_steps} steps, guidance {args.guidance:g}",
                     "precision": "bf16", "time (s)": s, "images/s": args.sample_n / s,
                     "peak memory, 2-step call (MiB)": peaks[key].mib, "memory measure": peaks[key].how})
    return rows


def dydit_system(args, dit_system):
    """The DyDiT recipe as a system (random routers, to be overwritten) in the DiT system's latent space."""
    c = dit_system.config
    sets = [f"data.image_size={c.data.image_size}", "data.num_classes=1000",
            f"model.first_stage={c.model.first_stage}", f"model.sd_vae_norm_groups={c.model.sd_vae_norm_groups}",
            f"model.guidance_channels={c.model.guidance_channels}",
            *[f"model.diffusion.{k}={getattr(c.model.diffusion, k)}"  # the process the DiT was trained for
              for k in ("schedule", "timesteps", "prediction", "variance")],
            f"train.device={dit_system.device.type}", *recipe_overrides(args, args.dydit_config)]
    config = load_config(DYDIT_RECIPE, sets)
    config = system_for(config).resolve_config(config)
    system = build_system(config).to(dit_system.device)
    system.space.load_state_dict(dit_system.space.state_dict())  # the first stage and the latent scale
    return system.eval()


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer DiT on 8x8x4 latents, batch 2, 3 steps: seconds")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out (the CPU needs a C++ compiler)")
    ap.add_argument("--configs", nargs="+", default=None, help="DiT sizes (default DiT-XL/2 DiT-B/2)")
    ap.add_argument("--dydit-config", default=None, help="the DiT size DyDiT is made from (default DiT-XL/2)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 32; tiny 2)")
    ap.add_argument("--dydit-batch", type=int, default=None, help="DyDiT forward batch (default 32; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed trainer steps after warm-up (default 20; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="trainer warm-up steps (default 10; tiny 1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 10; tiny 2)")
    ap.add_argument("--densities", nargs="+", default=["0.5,1", "0.75,0.6"],
                    help="DyDiT 'width,tokens' densities (these two count about lambda = 0.5 at 256 px)")
    ap.add_argument("--sample-n", type=int, default=None, help="images per sampling call (default 8; tiny 2)")
    ap.add_argument("--sample-steps", type=int, default=None, help="DDPM steps (default 250, the papers'; tiny 3)")
    ap.add_argument("--sample-repeats", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--out", default=None, help="write DIR/gpu_suite.json and DIR/gpu_suite.md instead of "
                                                "benchmarks/results/ and docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    tiny = args.tiny

    def default(value, full, small):
        return value if value is not None else (small if tiny else full)

    args.configs = default(args.configs, ["DiT-XL/2", "DiT-B/2"], ["DiT-XL/2", "DiT-B/2"])
    args.dydit_config = default(args.dydit_config, "DiT-XL/2", args.configs[0])
    args.batch = default(args.batch, 32, 2)
    args.dydit_batch = default(args.dydit_batch, 32, 2)
    args.steps = default(args.steps, 20, 2)
    args.warmup = default(args.warmup, 10, 1)
    args.repeats = default(args.repeats, 10, 2)
    args.sample_n = default(args.sample_n, 8, 2)
    args.sample_steps = default(args.sample_steps, 250, 3)
    args.bench_warmup = 1 if tiny else 3
    args.image_size = 64 if tiny else 256
    args.latent_side = args.image_size // 8
    args.log_every = math.gcd(args.warmup, args.steps)  # the first windows are the warm-up, the rest are timed

    command = "bash benchmarks/gpu_suite.sh" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    started = time.time()
    tables: dict[str, list[dict]] = {"trainer": [], "vs_diffusers": [], "dydit": [], "sampling": []}
    checks: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        work = Path(tmp)
        spec, groups = make_first_stage(work, tiny)
        source = f"imagenet:{work / 'imagenet'}"  # never read: training reads the store
        store = make_store(work / "store", spec, groups, source, args.image_size, args.latent_side,
                           count=max(4 * args.batch, 64))
        systems = {}
        for name in args.configs:
            say(f"{name}: the trainer from the store")
            row, systems[name] = train_with_trainer(args, name, spec, groups, store, source, work, device)
            tables["trainer"].append(row)
            say(f"{name}: training step against diffusers")
            rows, check = train_vs_diffusers(args, name, device)
            tables["vs_diffusers"] += rows
            checks.append(check)
        say(f"DyDiT from {args.dydit_config}: fast, masked, DiT")
        rows, pair = dydit_rows(args, args.dydit_config, device)
        tables["dydit"] = rows
        for name in args.configs:
            say(f"{name}: sampling")
            with_dydit = pair if name == args.dydit_config else None
            tables["sampling"] += sampling_rows(args, name, systems[name], with_dydit, device)
        if args.dydit_config not in args.configs:  # DyDiT's sampling row still needs a DiT system of its size
            say(f"{args.dydit_config}: sampling (DiT and DyDiT)")
            _, systems[args.dydit_config] = train_with_trainer(args, args.dydit_config, spec, groups, store, source,
                                                               work, device)
            tables["sampling"] += sampling_rows(args, args.dydit_config, systems[args.dydit_config], pair, device)

    machine = device_name(device)
    payload = {"name": "gpu_suite", "device": device.type, "device_name": machine, "torch": torch.__version__,
               "cuda": torch.version.cuda, "command": command, "date": time.strftime("%Y-%m-%d"),
               "tiny": tiny, "compiled": not args.no_compile, "seconds": round(time.time() - started, 1),
               "same_weights": checks, "rows": tables}
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "gpu_suite.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    section = render(payload, args)
    docs = out_dir / "gpu_suite.md" if args.out else DOCS
    write_section("gpu_suite", section, docs)
    print(section)
    say(f"wrote {json_path} and {docs}")
    if not all(c["passed"] for c in checks):
        sys.exit("the same-weights check between ours and diffusers failed: " + json.dumps(checks))


def render(payload: dict, args) -> str:
    where = f"{payload['device_name']} ({payload['device']})"
    lines = [f"## GPU suite: {where}", "",
             f"Machine: {where}, torch {payload['torch']}" + (f", CUDA {payload['cuda']}" if payload["cuda"] else "")
             + f". Date: {payload['date']}. Command: `{payload['command']}`"
             + (" (tiny sizes: a check that the suite runs, not a measurement)" if payload["tiny"] else ""), ""]
    what = {"trainer": "1. The Trainer on the recipe from a store of random latents (bf16, "
                       + ("compiled" if payload["compiled"] else "not compiled") + f"; {args.warmup} warm-up step(s), "
                       "then the Trainer's own images/s over the timed log windows).",
            "vs_diffusers": "2. One training step (forward, backward, AdamW, bf16 autocast) against diffusers' "
                            "DiTTransformer2DModel with the same weights; median of interleaved repeats.",
            "dydit": "3. DyDiT's fast path against its masked path and DiT, forward passes at lambda-0.5 densities.",
            "sampling": f"4. Sampling with system.sample ({args.sample_n} images, first-stage decoding included)."}
    for key, rows in payload["rows"].items():
        lines += [what[key], "", markdown_table([{k: v for k, v in r.items() if k != "memory measure"} for r in rows])]
        if rows and "memory measure" in rows[0]:
            lines += [f"Memory: {rows[0]['memory measure']}.", ""]
    checks = "; ".join(f"{c['config']}: max |ours - diffusers| {c['max |ours - diffusers| (fp32 forward)']:.1e} "
                       f"({'passed' if c['passed'] else 'FAILED'}, tolerance {c['tolerance']:.1e})"
                       for c in payload["same_weights"])
    lines += [f"Same weights, fp32 forward on the same inputs: {checks}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

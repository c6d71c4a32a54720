"""The page: ``Demo`` (the loaded runs and recent results across requests, one request at a time), the Gradio
Blocks wired to the functions of runs.py and drawing.py (``build_app``; gradio is imported only here, an optional
dependency) and ``serve``."""

import atexit
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from difflineage.demo.drawing import (
    MAX_IMAGES,
    Result,
    count,
    decode_latent,
    draw,
    inspect_sample,
    seed_line,
    summary,
)
from difflineage.demo.runs import EVERY_CLASS, MAX_RERANK, PRESET_OWN, SAMPLERS, DemoError, DemoRun, Request
from difflineage.errors import CheckpointError, ConfigError, DataError, RunDirError, StorageError

KEPT_RESULTS = 8  # requests whose images and traces are kept for downloads and inspection
USER_ERRORS = (CheckpointError, ConfigError, DataError, RunDirError, StorageError, ValueError, TypeError)


class Demo:
    """The page's state across requests: the loaded runs, the recent results (for downloads and inspection), one
    lock so that only one request uses the models at a time, and the folder the images are written into."""

    def __init__(self, runs: list[Path], device: str = "cpu", out_root: Optional[Path] = None,
                 roots: Optional[list[Path]] = None, any_run: bool = False):
        self.runs = [Path(r) for r in runs]
        # what the run box may load: the runs it was started with (or the folder they were found in) and what lies
        # beneath them; any path only when started with any_run (--any-run)
        self.roots = [Path(r).resolve() for r in (self.runs if roots is None else roots)]
        self.any_run = any_run
        self.device = device
        self.owns_out_root = out_root is None  # a temp folder of its own is removed at exit; a given one is kept
        self.out_root = Path(out_root or tempfile.mkdtemp(prefix="difflineage-demo-"))
        if self.owns_out_root:
            atexit.register(self.close)
        self.loaded: dict[str, DemoRun] = {}
        self.results: OrderedDict[str, Result] = OrderedDict()
        self.lock = threading.Lock()
        self.counter = 0

    def run(self, path: str) -> DemoRun:
        if not path:
            raise DemoError("choose a run (a directory under runs/, or type the path of one)")
        key = str(Path(path))
        if key not in self.loaded:
            resolved = Path(path).expanduser().resolve()
            if not self.any_run and not any(resolved.is_relative_to(root) for root in self.roots):
                raise DemoError(f"{path} is not a run this demo serves, nor beneath one; start the demo with it "
                                "(difflineage demo RUN ...), or with --any-run to load any path typed here")
            self.loaded[key] = DemoRun(Path(path), self.device)
        return self.loaded[key]

    def new_dir(self) -> tuple[str, Path]:
        self.counter += 1
        key = f"request-{self.counter:05d}"
        return key, self.out_root / key

    def close(self) -> None:
        """Remove the images of the recent requests when the folder is the demo's own temp folder."""
        if self.owns_out_root:
            shutil.rmtree(self.out_root, ignore_errors=True)

    def keep(self, key: str, result: Result) -> None:
        self.results[key] = result
        while len(self.results) > KEPT_RESULTS:
            _, old = self.results.popitem(last=False)
            shutil.rmtree(old.out_dir, ignore_errors=True)


def message(exc: BaseException) -> str:
    """What the page says about a failed request: the error's own message, never a traceback."""
    if isinstance(exc, (DemoError,) + USER_ERRORS):
        return f"**Error:** {exc}"
    traceback.print_exc(file=sys.stderr)
    return f"**Error:** {type(exc).__name__}: {exc} (the server's log has the details; the page keeps serving)"


def theme():
    """Gradio's base theme with the system's own fonts: the page loads nothing from outside localhost."""
    import gradio as gr

    return gr.themes.Base(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def build_app(demo: Demo):
    """The Gradio Blocks of the page (gradio imported here: it is an optional dependency)."""
    import gradio as gr

    choices = [str(r) for r in demo.runs]
    hidden = gr.update(visible=False)

    with gr.Blocks(title="difflineage demo", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# difflineage demo\nSample a trained run. Every control is explained in docs/demo.md.")
        run_box = gr.Dropdown(choices=choices, value=choices[0] if choices else None, allow_custom_value=True,
                              label="run (a run directory: choose one found, or type a path)", elem_id="run")
        about = gr.Markdown(elem_id="about")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                preset = gr.Dropdown(choices=[PRESET_OWN], value=PRESET_OWN, label="example settings",
                                     elem_id="preset")
                class_box = gr.Dropdown(choices=[EVERY_CLASS], value=EVERY_CLASS, allow_custom_value=True,
                                        label="class (by name)", elem_id="class")
                caption_box = gr.Dropdown(choices=[], value="", allow_custom_value=True, visible=False,
                                          label="caption (type your own, or choose one of the data's: held-out first)",
                                          elem_id="caption")
                n_box = gr.Slider(1, MAX_IMAGES, value=16, step=1, label="number of images", elem_id="n")
                with gr.Row():
                    seed_box = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                    randomize = gr.Checkbox(value=False, label="randomize", elem_id="randomize")
                guidance = gr.Slider(0, 10, value=3, step=0.25, label="guidance (1: none)", elem_id="guidance")
                steps = gr.Slider(1, 1000, value=50, step=1, label="steps", elem_id="steps")
                sampler = gr.Radio(list(SAMPLERS), value="ddim", label="sampler", elem_id="sampler")
                fast = gr.Checkbox(value=False, elem_id="fast",
                                   label="fast path (as sample --fast: step cache, compiled DiT blocks, bf16 where "
                                         "native; picks DPM-Solver++ 20 steps)")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature", elem_id="temperature")
                rerank = gr.Slider(1, MAX_RERANK, value=1, step=1, label="rerank: candidates per image (CLIP keeps "
                                   "the best)", elem_id="rerank")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Group(visible=False) as latent_group:
                    gr.Markdown("2-D latent: move the point, see its decoding")
                    z1 = gr.Slider(-3, 3, value=0, step=0.05, label="z1", elem_id="z1")
                    z2 = gr.Slider(-3, 3, value=0, step=0.05, label="z2", elem_id="z2")
                    latent_image = gr.Image(label="decoded", type="numpy", elem_id="latent-image", interactive=False)
            with gr.Column(scale=3):
                seed_used = gr.Markdown(elem_id="seed-used")
                with gr.Row():
                    with gr.Column():
                        gallery0 = gr.Gallery(label="samples", columns=6, object_fit="contain", height="auto",
                                              elem_id="gallery-0")
                        stats0 = gr.Markdown(elem_id="stats-0")
                    with gr.Column(visible=False) as column1:
                        gallery1 = gr.Gallery(label="DiT (its base)", columns=6, object_fit="contain", height="auto",
                                              elem_id="gallery-1")
                        stats1 = gr.Markdown(elem_id="stats-1")
                files = gr.File(label="download: PNG grid and npz (arr_0: uint8 N x H x W x 3)", file_count="multiple",
                                elem_id="files", interactive=False)
                with gr.Group(visible=False) as inspect_group:
                    gr.Markdown("DyDiT, for one sample (click an image of the DyDiT gallery): the heads and MLP "
                                "groups each layer computed at each of its timesteps, and where its tokens went "
                                "through the MLP")
                    sample_index = gr.Number(value=0, precision=0, minimum=0, label="sample", elem_id="sample-index")
                    width_image = gr.Image(label="active heads and MLP groups per layer", type="filepath",
                                           elem_id="width-picture", interactive=False, show_label=False)
                    token_image = gr.Image(label="token maps", type="filepath", elem_id="token-picture",
                                           interactive=False, show_label=False)
        result_key = gr.State("")

        run_outputs = [about, status, preset, class_box, caption_box, guidance, steps, sampler, fast, temperature, rerank,
                       latent_group, column1, inspect_group, gallery0, gallery1, stats0, stats1, seed_used, files,
                       width_image, token_image, latent_image, generate]

        def on_run(path):
            """Show the controls the chosen run's family takes, with its own settings; clear the last results."""
            cleared = {gallery0: gr.update(value=[]), gallery1: gr.update(value=[]), stats0: "", stats1: "",
                       seed_used: "", files: None, width_image: None, token_image: None, latent_image: None}
            try:
                with demo.lock:
                    run = demo.run(path)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
                return {**cleared, about: "", status: message(exc), generate: gr.update(interactive=False),
                        **{c: hidden for c in (preset, class_box, caption_box, guidance, steps, sampler, fast, temperature,
                                               rerank, latent_group, column1, inspect_group)}}
            d = run.defaults()
            kind = run.condition_kind
            return {**cleared, about: run.describe(), status: "", generate: gr.update(interactive=True),
                    preset: gr.update(visible=True, choices=list(run.presets()), value=PRESET_OWN),
                    class_box: gr.update(visible=kind == "class", choices=[EVERY_CLASS] + run.class_names,
                                         value=d["condition"] if kind == "class" else EVERY_CLASS),
                    caption_box: gr.update(visible=kind == "caption", choices=run.caption_suggestions,
                                           value=d["condition"] if kind == "caption" else ""),
                    guidance: gr.update(visible=run.takes_guidance, value=d["guidance"]),
                    steps: gr.update(visible=run.diffusion, value=d.get("steps", 50), maximum=d.get("max_steps", 1000)),
                    sampler: gr.update(visible=run.diffusion, value=d.get("sampler", "ddim")),
                    fast: gr.update(visible=run.diffusion, value=False),
                    temperature: gr.update(visible=run.takes_temperature and not run.latent_2d, value=d["temperature"]),
                    rerank: gr.update(visible=run.can_rerank, value=d["rerank"]),
                    latent_group: gr.update(visible=run.latent_2d),
                    column1: gr.update(visible=len(run.models) > 1),
                    inspect_group: gr.update(visible=run.models[0].dynamic),
                    gallery0: gr.update(label=run.models[0].title, value=[], visible=True),
                    latent_image: decode_latent(run, 0.0, 0.0, d["condition"]) if run.latent_2d else None}

        run_box.change(on_run, [run_box], run_outputs)
        app.load(on_run, [run_box], run_outputs)

        def on_fast(on):
            return (gr.update(value="dpmpp_2m"), gr.update(value=20)) if on else (gr.update(), gr.update())

        fast.change(on_fast, [fast], [sampler, steps])
        controls = {"guidance": guidance, "steps": steps, "sampler": sampler, "fast": fast, "temperature": temperature,
                    "rerank": rerank}

        def on_preset(path, name):
            """Set the controls an example names; the others keep their values."""
            try:
                with demo.lock:
                    chosen = demo.run(path).presets().get(name, {})
            except Exception:  # noqa: BLE001 - the run box says what is wrong with the run
                chosen = {}
            return [gr.update(value=chosen[k]) if k in chosen else gr.update() for k in controls]

        preset.change(on_preset, [run_box, preset], list(controls.values()))

        def on_generate(path, cls, caption, n, seed, rand, g, k, smp, fst, temp, rr,
                        progress=gr.Progress()):
            unchanged = [gr.update()] * 10  # a failed request leaves the last results on the page
            try:
                with demo.lock:
                    run = demo.run(path)
                    request = Request(condition=caption if run.condition_kind == "caption" else cls, n=int(n),
                                      seed=seed, randomize=rand, guidance=g, steps=k, sampler=smp, fast=fst,
                                      temperature=temp, rerank=rr)
                    key, out_dir = demo.new_dir()
                    result = draw(run, request, out_dir, progress=lambda f, what: progress(f, desc=what))
                    demo.keep(key, result)
            except Exception as exc:  # noqa: BLE001
                yield [message(exc)] + unchanged
                return
            yield page_outputs(run, result, key, status=" ".join(filter(None, [result.note, "counting FLOPs..."])))
            try:
                with demo.lock:
                    count(run, result)
                    pictures = inspect_sample(run, result, 0, result.out_dir) if run.models[0].dynamic else (None, None)
            except Exception as exc:  # noqa: BLE001
                yield page_outputs(run, result, key, status=message(exc))
                return
            yield page_outputs(run, result, key, status=result.note, pictures=pictures)

        def page_outputs(run, result, key, status, pictures=(None, None)):
            galleries = [[(str(f), c) for f, c in zip(d.image_files, result.captions)] for d in result.drawn]
            return [status, seed_line(result), galleries[0], summary(run, result, 0),
                    galleries[1] if len(galleries) > 1 else [], summary(run, result, 1) if len(galleries) > 1 else "",
                    [str(f) for f in result.files], key, str(pictures[0]) if pictures[0] else None,
                    str(pictures[1]) if pictures[1] else None, 0]

        generate.click(on_generate, [run_box, class_box, caption_box, n_box, seed_box, randomize, guidance, steps,
                                     sampler, fast, temperature, rerank],
                       [status, seed_used, gallery0, stats0, gallery1, stats1, files, result_key, width_image,
                        token_image, sample_index])

        def on_inspect(path, key, index):
            try:
                with demo.lock:
                    run = demo.run(path)
                    if not run.models[0].dynamic:  # only a DyDiT has heads, groups and tokens to show
                        return "", None, None
                    if key not in demo.results:
                        raise DemoError("generate first: there is no sample to inspect yet")
                    width, tokens = inspect_sample(run, demo.results[key], index, demo.results[key].out_dir)
            except Exception as exc:  # noqa: BLE001
                return message(exc), None, None
            return "", str(width), str(tokens)

        def on_select(path, key, evt: gr.SelectData):
            return [evt.index, *on_inspect(path, key, evt.index)]

        gallery0.select(on_select, [run_box, result_key], [sample_index, status, width_image, token_image])
        sample_index.submit(on_inspect, [run_box, result_key, sample_index], [status, width_image, token_image])

        def on_latent(path, cls, a, b):
            try:
                with demo.lock:
                    return "", decode_latent(demo.run(path), a, b, cls)
            except Exception as exc:  # noqa: BLE001
                return message(exc), None

        for slider in (z1, z2):
            slider.change(on_latent, [run_box, class_box, z1, z2], [status, latent_image])
    return app


def serve(runs: list[Path], host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
          block: bool = True, roots: Optional[list[Path]] = None, any_run: bool = False):
    """Start the page on http://HOST:PORT for ``runs`` (the first is shown first); its run box loads those runs and
    what lies beneath them or beneath ``roots`` (any path with ``any_run``). Offline: no analytics, no share link,
    no fonts or scripts from elsewhere. Returns the Gradio app (with ``block=False``, for tests and the benchmark,
    which then call ``app.close()``)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DemoError('the demo needs Gradio: pip install -e ".[demo]" (or make demo)') from None
    demo = Demo(runs, device=device, roots=roots, any_run=any_run)
    app = build_app(demo)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
               ssr_mode=False, theme=theme(), footer_links=[], allowed_paths=[str(demo.out_root)], quiet=True,
               show_error=False)
    return app

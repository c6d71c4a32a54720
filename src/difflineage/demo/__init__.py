"""The browser demo, ``difflineage demo [RUN ...]``: a page on localhost that samples any trained run.

The page asks for what the run's family takes: a class by name (or a caption, for caption-conditioned runs), the
number of images, a seed (or a random one, always shown so that a picture can be drawn again), and the family's
options: guidance, steps, sampler and the fast path (as ``sample --fast``) for the diffusion systems, the
temperature of the autoregressive priors (and the VAE), the rerank count of a DALL-E prior that carries a CLIP, and
for a VAE with a 2-D latent a point of the latent plane, decoded as it moves. It shows a gallery, the wall-clock
time per image and the arithmetic counted per image (torch's FlopCounterMode, eval/flops.py), and offers the images
as a PNG grid and an npz (ADM's layout, as ``sample --npz``). A DyDiT is drawn beside the DiT it was fine-tuned
from, with the same seed and settings, and for a sample picked in its gallery the page draws which heads and MLP
groups each layer computed at each timestep and where its token routers sent tokens through the MLP
(eval/dydit_pictures.py, drawn from that very run).

The page's functions live without Gradio in runs.py (``DemoRun``, ``Request``) and drawing.py (``draw``,
``count``, ``inspect_sample``, ``decode_latent``): the tests call them directly. page.py's ``build_app`` wires them
into Gradio, imported only there: it is an optional dependency (``pip install -e ".[demo]"``). Every bad
request (an unknown class, a caption for a class-conditional run, a directory that is not a run, an option out of
range) comes back as a ``DemoError`` whose message the page shows; the server keeps serving.
"""

from difflineage.demo.drawing import (
    MAX_IMAGES,
    Drawn,
    Result,
    count,
    decode_latent,
    draw,
    flops_text,
    inspect_sample,
    seed_line,
    summary,
)
from difflineage.demo.page import Demo, build_app, message, serve
from difflineage.demo.runs import EVERY_CLASS, DemoError, DemoRun, Model, Request, check_run, find_runs

__all__ = ["EVERY_CLASS", "MAX_IMAGES", "Demo", "DemoError", "DemoRun", "Drawn", "Model", "Request", "Result",
           "build_app", "check_run", "count", "decode_latent", "draw", "find_runs", "flops_text", "inspect_sample",
           "message", "seed_line", "serve", "summary"]

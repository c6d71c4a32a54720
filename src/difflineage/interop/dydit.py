"""DyDiT weights: the released checkpoints of the DyDiT code (DiT's official key names plus, per block,
``attn_rate.router.{weight,bias}`` and ``mlp_rate.router.{weight,bias}`` [H, D] (the released inference code
and its dydit_0.7.pth route every head and MLP group) or [H - 1, D] (unit 0 always on, as the DyDiT training
code and this library's fine-tuning make them), ``token_selection.mlp_head.0.{weight,bias}`` [D / 16, D] and
``token_selection.mlp_head.2.{weight,bias}`` [1, D / 16]).

:class:`~difflineage.models.dydit.DyDiT` uses these names, so a file loads with no renaming, strictly: a
missing, unexpected or misshapen key is named. The number of heads is that of the paper's size with the file's
depth and width (else the one that the routers' rows and the width allow, else the one given); the routers' rows
then say which layout the file has.
Files are read as the DiT ones are (safetensors, or ``torch.load(weights_only=True)``; the ``ema`` entry of
a training checkpoint preferred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from difflineage.errors import CheckpointError
from difflineage.interop.dit import _pick_weights, _read, dit_config_of, infer_dit_settings
from difflineage.models.dit import DIT_SIZES
from difflineage.models.dydit import DyDiT, DyDiTConfig, router_keys_of
from difflineage.weights import load_state_dict_strict

StateDict = dict[str, torch.Tensor]


def read_dydit_state(path: Union[str, Path]) -> tuple[StateDict, str]:
    """The weights in a DiT or DyDiT file and which entry of the file they came from."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected a DiT or DyDiT checkpoint (.pt or .safetensors)")
    return _pick_weights(_read(path), str(path))


def width_layout(state: StateDict, source: str, heads: Optional[int] = None,
                 fallback_heads: Optional[int] = None) -> tuple[Optional[int], Optional[bool]]:
    """(heads, keep_first) of a DyDiT file's width routers: their rows are H (every unit routed, the released
    layout: keep_first False) or H - 1 (unit 0 always on: True). ``heads``: given by the caller; else the paper's
    size with this depth and width, else the one count of the two that divides the width, else ``fallback_heads``.
    (heads, None) for a file without width routers (its heads as given, or None)."""
    w = state.get("blocks.0.attn_rate.router.weight", state.get("blocks.0.mlp_rate.router.weight"))
    if w is None:
        return heads, None
    rows, hidden = int(w.shape[0]), int(w.shape[1])
    given = heads
    if heads is None:
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        heads = next((h for d, width, h in DIT_SIZES.values() if (d, width) == (depth, hidden)), None)
    if heads is None:
        fits = [h for h in (rows, rows + 1) if h > 0 and hidden % h == 0]
        heads = fits[0] if len(fits) == 1 else fallback_heads
        if heads is None:
            raise CheckpointError(f"{source}: width routers of {rows} outputs fit {rows} heads (every unit routed) "
                                  f"and {rows + 1} (unit 0 always on); say which with heads=")
    if rows == heads:
        return heads, False
    if rows == heads - 1:
        return heads, True
    said = "was asked for" if given is not None else "is this size's"
    raise CheckpointError(f"{source}: heads={heads} {said}, but the width routers have {rows} outputs: {heads} "
                          f"(every unit routed, the released layout) or {heads - 1} (unit 0 always on) expected")


def load_official_dydit(path: Union[str, Path], heads: Optional[int] = None) -> tuple[DyDiT, dict[str, Any]]:
    """Build a :class:`DyDiT` in eval mode from a released DyDiT checkpoint; returns it and the inferred
    settings (as :func:`~difflineage.interop.dit.load_official_dit`, plus ``width`` and ``tokens``: which
    routers the file has).

    :raises CheckpointError: naming the file and the keys that do not fit (a plain DiT file has no routers:
        load it with ``load_official_dit``, or fine-tune it with the dydit system's ``model.base``).
    """
    state, which = read_dydit_state(path)
    routers = router_keys_of(state)
    if not routers:
        raise CheckpointError(f"{path}: no DyDiT routers (attn_rate / mlp_rate / token_selection keys); this is a "
                              "plain DiT checkpoint: load it with load_official_dit, or fine-tune it into a DyDiT "
                              "(system dydit, model.base=PATH)")
    heads, keep_first = width_layout(state, str(path), heads)
    s = infer_dit_settings(state, str(path), heads=heads)
    dynamic = DyDiTConfig(width=any(".attn_rate." in k or ".mlp_rate." in k for k in routers),
                          tokens=any(".token_selection." in k for k in routers), keep_first=keep_first is not False)
    cfg = dit_config_of(s)
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = DyDiT(cfg, s["in_channels"], s["input_size"], s["num_classes"], dynamic=dynamic)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, state, str(path))
    return model.eval(), {**s, "weights": which, "width": dynamic.width, "tokens": dynamic.tokens,
                          "keep_first": dynamic.keep_first}

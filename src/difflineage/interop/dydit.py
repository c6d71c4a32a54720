"""DyDiT weights: the released checkpoints of the DyDiT code (DiT's official key names plus, per block,
``attn_rate.router.{weight,bias}`` [H - 1, D], ``mlp_rate.router.{weight,bias}`` [H - 1, D],
``token_selection.mlp_head.0.{weight,bias}`` [D / 16, D] and ``token_selection.mlp_head.2.{weight,bias}`` [1, D / 16]).

:class:`~difflineage.models.dydit.DyDiT` uses these names, so a file loads with no renaming, strictly: a
missing, unexpected or misshapen key is named. The number of heads is read from the head router's rows.
Files are read as the DiT ones are (safetensors, or ``torch.load(weights_only=True)``; the ``ema`` entry of
a training checkpoint preferred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from difflineage.errors import CheckpointError
from difflineage.interop.dit import _pick_weights, _read, dit_config_of, infer_dit_settings
from difflineage.models.dydit import DyDiT, DyDiTConfig, router_keys_of
from difflineage.weights import load_state_dict_strict

StateDict = dict[str, torch.Tensor]


def read_dydit_state(path: Union[str, Path]) -> tuple[StateDict, str]:
    """The weights in a DiT or DyDiT file and which entry of the file they came from."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected a DiT or DyDiT checkpoint (.pt or .safetensors)")
    return _pick_weights(_read(path), str(path))


def router_heads(state: StateDict) -> Optional[int]:
    """The attention heads a DyDiT file records in its width routers (H - 1 outputs each); None for a plain DiT
    file (or one with token routers only), whose heads no tensor records."""
    w = state.get("blocks.0.attn_rate.router.weight", state.get("blocks.0.mlp_rate.router.weight"))
    return int(w.shape[0]) + 1 if w is not None else None


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
    recorded = router_heads(state)
    if recorded is not None:
        if heads is not None and heads != recorded:
            raise CheckpointError(f"{path}: heads={heads} was asked for but the routers have {recorded - 1} "
                                  f"outputs, i.e. {recorded} heads")
        heads = recorded
    s = infer_dit_settings(state, str(path), heads=heads)
    dynamic = DyDiTConfig(width=any(".attn_rate." in k or ".mlp_rate." in k for k in routers),
                          tokens=any(".token_selection." in k for k in routers))
    cfg = dit_config_of(s)
    with torch.device("meta"):  # shapes only: the weights come from the file
        model = DyDiT(cfg, s["in_channels"], s["input_size"], s["num_classes"], dynamic=dynamic)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, state, str(path))
    return model.eval(), {**s, "weights": which, "width": dynamic.width, "tokens": dynamic.tokens}

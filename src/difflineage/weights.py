"""Reading weights safely and loading them strictly.

Nothing here unpickles code: weights come from safetensors, or from a torch file read with
``torch.load(weights_only=True)``. Strict loading names every missing, unexpected or misshapen key.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from difflineage.errors import CheckpointError

StateDict = dict[str, torch.Tensor]


def read_weights(path: Path, what: str, safe_classes: tuple = ()) -> dict:
    """Read a weights file from another project: safetensors, or a torch file with weights_only=True (plus
    ``safe_classes``, plain-data classes that need no code to rebuild). Anything else is refused by name."""
    path = Path(path)
    if path.suffix == ".safetensors" or _is_safetensors(_head(path)):  # by content too: a .pt that is safetensors
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError, OSError, ...
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    obj = torch_load_safely(path, what, safe_classes=safe_classes)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict of {what}")
    return obj


def torch_load_safely(path: Path, what: str, safe_classes: tuple = (), map_location="cpu"):
    """``torch.load(path, weights_only=True)`` (plus ``safe_classes``), its failures told apart: a file that holds
    pickled code or objects is refused without ever being unpickled (and without torch's advice to retry with
    ``weights_only=False``, which is what must not be done with a file from elsewhere); a file that is not a torch
    file, or is truncated, is named as such."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(safe_classes)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; check the path to {what}") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:  # a class or function to import: code the file would run
            raise CheckpointError(f"{path}: refused: it holds pickled code or objects (it names {found.group(1)}), "
                                  "not only tensors and plain values, and difflineage never unpickles code. Do not load "
                                  "it with weights_only=False unless you made it yourself; convert it to .safetensors "
                                  "where you trust it") from None
        raise CheckpointError(f"{path}: {_kind_of(path)}; expected {what}. Check the path, or get the file again "
                              f"(UnpicklingError)") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: {_kind_of(path)}; expected {what}. Check the path, or get the file again "
                              f"({type(exc).__name__})") from None


def _kind_of(path: Path) -> str:
    """What a file that torch could not read seems to be, from its first bytes."""
    head = _head(path)
    if head.startswith(b"PK"):
        return "a damaged or truncated torch file (its zip archive cannot be read)"
    if head[:1] == b"\x80":
        return "a damaged or truncated torch file (its pickle cannot be read)"
    return f"not a torch file (it starts with {head[:8]!r}; a torch file is a zip archive or a pickle)"


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file begins with its header's length (8 bytes, little-endian) and then the JSON header."""
    return len(head) >= 9 and 1 < int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{"


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except OSError:
        return b""


def load_state_dict_strict(module: nn.Module, state: StateDict, source: str) -> None:
    """Load ``state`` into ``module``, refusing with every missing, unexpected or misshapen key named.
    Keys a module lists in ``variable_size_keys`` (data whose size comes with the file, such as a tokenizer
    kept as bytes) take the file's shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    variable = set(getattr(module, "variable_size_keys", ()))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape and k not in variable)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))
    for key in variable & set(state):  # a buffer of the file's size, on the module's device, then loaded as any other
        owner, _, name = key.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        setattr(holder, name, torch.zeros_like(state[key], device=getattr(holder, name).device))
    module.load_state_dict(state, strict=True)


def state_digest(state: StateDict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values (the identity of a frozen stage's weights: a
    latent store records the digest of the first stage that made it). The values are read in their logical order,
    so a network held channels-last has the digest it has in the default layout."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu")
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.flatten().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plain_tensors(state: StateDict) -> StateDict:
    """Each tensor detached, on the CPU, contiguous and in memory of its own: safetensors refuses tensors that
    share memory, so a copy per tensor keeps every written file self-contained."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def save_safetensors(state: StateDict, path: str | Path, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``state`` as a safetensors file one tensor at a time: the header, then each tensor's bytes, so the
    memory it needs beyond the tensors is one tensor on the CPU, not a copy of the whole state (safetensors'
    ``save_file`` holds a clone and a byte string of everything: 5.4 GB more for a DiT-XL/2 checkpoint file).
    The file is the format's (8-byte header length, JSON header, data); safetensors reads it back bit for bit."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in state.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: {t.dtype} tensors cannot be written to safetensors here")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in state.values():
            if t.numel():
                fh.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return Path(path)


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """The entries of ``state`` whose keys start with ``prefix`` (one part of a system), the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["StateDict", "load_state_dict_strict", "plain_tensors", "read_weights", "save_safetensors", "state_digest",
           "strip_prefix", "torch_load_safely"]

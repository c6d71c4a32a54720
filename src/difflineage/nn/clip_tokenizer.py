"""CLIP's byte-level BPE tokenizer, read from the files a Stable Diffusion model comes with (``tokenizer/vocab.json``
and ``tokenizer/merges.txt``) through the ``tokenizers`` library, and padded as SD pads.

Text is NFC-normalised, its whitespace runs collapsed to one space, lower-cased, split into contractions, letter
runs, single digits and punctuation runs, mapped to byte-level symbols and merged; each word ends in ``</w>``.
A sequence is ``<|startoftext|>``, at most ``max_length - 2`` tokens, ``<|endoftext|>``, then the pad token to
``max_length`` (77): SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!`` (the ``pad_token`` of the folder's
``tokenizer_config.json`` or ``special_tokens_map.json``). Longer captions are cut, and the cut is reported.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
import torch

from difflineage.errors import CheckpointError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# contractions, letter runs, single digits, runs of other non-space characters (CLIP's pre-tokenizing pattern)
_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _pad_token(folder: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if isinstance(pad, dict):  # {"content": "!", ...}
                pad = pad.get("content")
            if pad:
                return pad
    return EOS


class CLIPTokenizer:
    """Captions -> (N, max_length) token ids, as Stable Diffusion's pipelines make them."""

    def __init__(self, vocab: str | Path, merges: str | Path, max_length: int = 77, pad_token: str = EOS):
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        for path in (vocab, merges):
            if not Path(path).is_file():
                raise CheckpointError(f"{path}: no such file; CLIP's tokenizer is read from vocab.json and "
                                      "merges.txt (the model folder's tokenizer/)")
        bpe = models.BPE.from_file(str(vocab), str(merges), unk_token=EOS, end_of_word_suffix="</w>",
                                   continuing_subword_prefix="", fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        self.tokenizer = tok
        self.max_length = max_length
        ids = {name: tok.token_to_id(name) for name in (BOS, EOS, pad_token)}
        absent = [name for name, i in ids.items() if i is None]
        if absent:
            raise CheckpointError(f"{vocab}: lacks {', '.join(absent)}; not a CLIP vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[pad_token]

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 77) -> "CLIPTokenizer":
        """A diffusers ``tokenizer/`` folder (vocab.json, merges.txt and the pad token of its config)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no tokenizer folder; a Stable Diffusion model needs tokenizer/ with "
                                  "vocab.json and merges.txt (they come with every SD release, e.g. in the diffusers "
                                  "folder of runwayml/stable-diffusion-v1-5)")
        return cls(folder / "vocab.json", folder / "merges.txt", max_length, _pad_token(folder))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def tokens(self, caption: str) -> list[int]:
        """The caption's BPE ids, without start, end or padding."""
        return self.tokenizer.encode(caption, add_special_tokens=False).ids

    def __call__(self, captions: list[str], warn: bool = True) -> torch.Tensor:
        """(N, max_length) long ids. A caption longer than ``max_length - 2`` tokens is cut; with ``warn`` the cut
        words are named in a warning (SD's pipelines do the same)."""
        keep = self.max_length - 2
        out = torch.full((len(captions), self.max_length), self.pad_id, dtype=torch.long)
        encoded = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)  # one call (a training step's)
        for i, ids in enumerate(enc.ids for enc in encoded):
            if len(ids) > keep and warn:
                dropped = self._text(ids[keep:])
                warnings.warn(f"caption cut to {self.max_length} tokens (CLIP's limit); dropped: {dropped!r}",
                              stacklevel=2)
            row = [self.bos_id, *ids[:keep], self.eos_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(N, L) ids -> the text between the start token and the first end token of each row."""
        out = []
        for row in ids.tolist():
            row = row[1:] if row and row[0] == self.bos_id else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            out.append(self._text(row))
        return out

    def _text(self, ids: list[int]) -> str:
        """Byte-level pieces back to text; a piece ending in ``</w>`` ends a word."""
        words, piece = [], []
        for token in (self.tokenizer.id_to_token(i) for i in ids):
            piece.append(token.removesuffix("</w>"))
            if token.endswith("</w>"):
                words.append(self.tokenizer.decoder.decode(piece))
                piece = []
        if piece:
            words.append(self.tokenizer.decoder.decode(piece))
        return " ".join(words)

"""A byte-pair-encoding caption tokenizer (DALL-E's text side), trained on a dataset's captions with the
Hugging Face ``tokenizers`` library and stored with the checkpoint as its JSON.

Captions are lower-cased and split on whitespace and punctuation, then merged into sub-word units up to
``vocab_size`` entries. Token sequences have a fixed length: ``[BOS]``, the caption's tokens (cut when too
long), then ``[PAD]`` to the end. The empty caption ``""`` (``[BOS]`` and padding only) is the null condition of
classifier-free guidance.
"""

from __future__ import annotations

import torch

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
SPECIAL = (PAD, BOS, UNK)  # ids 0, 1, 2


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ImportError("the caption tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    return tokenizers


class CaptionTokenizer:
    """Captions <-> fixed-length id tensors. Build with :meth:`train` or :meth:`from_json`."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        if (self.pad_id, self.bos_id) != (0, 1):
            raise ValueError("not a difflineage caption tokenizer: [PAD] and [BOS] must be ids 0 and 1")

    @classmethod
    def train(cls, captions: list[str], vocab_size: int) -> "CaptionTokenizer":
        """Learn BPE merges from ``captions``. The library numbers the starting alphabet in an order that varies
        from process to process, so the ids are renumbered canonically (specials, the alphabet sorted, then
        merged units in merge order): the same captions give the same ids in every process and every run."""
        tk = _require_tokenizers()
        if vocab_size < 16:
            raise ValueError(f"a BPE vocabulary of {vocab_size} is too small; use at least 16")
        tok = tk.Tokenizer(tk.models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
        tok.normalizer = tk.normalizers.Sequence([tk.normalizers.NFKC(), tk.normalizers.Lowercase()])
        tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        tok.decoder = tk.decoders.BPEDecoder()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                         end_of_word_suffix="</w>")
        tok.train_from_iterator(captions, trainer=trainer)
        return cls(tk.Tokenizer.from_str(_canonical_ids(tok.to_str())))

    @classmethod
    def from_json(cls, text: str) -> "CaptionTokenizer":
        return cls(_require_tokenizers().Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, captions: list[str], length: int) -> torch.Tensor:
        """(N, length) long ids: BOS, the caption's tokens (at most length - 1), PAD to the end."""
        out = torch.full((len(captions), length), self.pad_id, dtype=torch.long)
        out[:, 0] = self.bos_id
        for i, enc in enumerate(self.tokenizer.encode_batch(list(captions))):
            ids = enc.ids[: length - 1]
            out[i, 1: 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(N, L) ids -> captions (BOS and PAD dropped)."""
        return [self.tokenizer.decode([i for i in row.tolist() if i > 1]) for row in ids]


def _canonical_ids(text: str) -> str:
    """A trained BPE tokenizer's JSON with its vocabulary renumbered in a fixed order (special tokens keep theirs)."""
    import json

    data = json.loads(text)
    vocab = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    merged = ["".join(m) for m in merges]
    alphabet = sorted(t for t in vocab if t not in SPECIAL and t not in set(merged))
    order = list(SPECIAL) + alphabet + [t for t in dict.fromkeys(merged) if t in vocab]
    if sorted(order) != sorted(vocab):
        raise ValueError("unexpected BPE vocabulary layout: tokens outside the alphabet and the merges")
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    return json.dumps(data)

"""Stable Diffusion's CLIP text encoders and tokenizer against transformers': the towers to 1e-5 in both layouts,
the token ids equal over a vocabulary made here."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from difflineage.errors import CheckpointError
from difflineage.interop.sd_text import (
    config_from_state,
    config_from_transformers,
    config_to_transformers,
    from_ours,
    to_ours,
)
from difflineage.models.clip_text import CLIPTextEncoder
from difflineage.nn.clip_tokenizer import CLIPTokenizer
from helpers import make_clip_vocab

transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photograph of an astronaut riding a horse", "A  RED apple, on a table!", "it's 3 o'clock",
            "thumbs up: medium-dark skin tone", "flag: Japan", "woman office worker"]


def _hf_text(act: str = "quick_gelu", layers: int = 3) -> "transformers.CLIPTextModel":
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=300, hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
                                      num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
                                      bos_token_id=298, eos_token_id=299, pad_token_id=1)
    return transformers.CLIPTextModel(cfg).eval()


def _ours(ref) -> CLIPTextEncoder:
    cfg = config_from_transformers(ref.config.to_dict())
    model = CLIPTextEncoder(cfg).eval()
    model.load_state_dict(to_ours(ref.state_dict(), cfg, "transformers"), strict=True)
    return model


def test_sd1_tower_matches_transformers():
    ref = _hf_text()
    ours = _ours(ref)
    ids = torch.randint(0, 300, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = ours(ids)
    assert (got - want).abs().max().item() < 1e-5


def test_sd2_tower_reads_the_penultimate_layer_in_both_layouts(tmp_path):
    """OpenCLIP's file holds all layers and SD 2.x reads the penultimate one through the final norm; diffusers'
    folder holds one layer fewer and reads its end. Both give the same features."""
    ref = _hf_text("gelu", layers=4)
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        want = getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-2])
    full = _ours(ref)
    full.cfg.skip_last = 1
    open_clip = from_ours(full.state_dict(), full.cfg, "open_clip")
    assert "transformer.resblocks.3.attn.in_proj_weight" in open_clip
    cfg = config_from_state(open_clip, "open_clip")
    assert (cfg.layers, cfg.skip_last, cfg.activation, cfg.heads) == (4, 1, "gelu", 2)
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(to_ours(open_clip, cfg, "open_clip"), strict=True)
    with torch.no_grad():
        assert (ours(ids) - want).abs().max().item() < 1e-5
    # to the diffusers folder: three layers, read at their end; loads in transformers and agrees
    written = from_ours(ours.state_dict(), cfg, "transformers")
    save_file(written, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config_to_transformers(cfg)))
    short = transformers.CLIPTextModel.from_pretrained(str(tmp_path)).eval()
    hf_cfg = short.config
    assert hf_cfg.num_hidden_layers == 3
    with torch.no_grad():
        assert (short(ids).last_hidden_state - want).abs().max().item() < 1e-5
    # and back to OpenCLIP's layout: a zero fourth layer stands where SD 2.x's file has one it never reads
    three = CLIPTextEncoder(config_from_transformers(hf_cfg.to_dict())).eval()
    three.load_state_dict(to_ours(written, three.cfg, "transformers"), strict=True)
    again = from_ours(three.state_dict(), three.cfg, "open_clip")
    assert torch.count_nonzero(again["transformer.resblocks.3.mlp.c_fc.weight"]) == 0
    cfg4 = config_from_state(again, "open_clip")
    back = CLIPTextEncoder(cfg4).eval()
    back.load_state_dict(to_ours(again, cfg4, "open_clip"), strict=True)
    with torch.no_grad():
        assert (back(ids) - want).abs().max().item() < 1e-5


def test_another_model_is_refused_by_name():
    ref = _hf_text()
    cfg = config_from_transformers(ref.config.to_dict())
    state = dict(ref.state_dict())
    state["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="vision_model.embeddings"):
        to_ours(state, cfg, "transformers", "text_encoder/model.safetensors")
    with pytest.raises(CheckpointError, match="CLIPVisionModel"):
        config_from_transformers({"architectures": ["CLIPVisionModel"]})


# ---------------------------------------------------------------------------------------------------------------------
# the tokenizer


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    return make_clip_vocab(tmp_path_factory.mktemp("tokenizer"), CAPTIONS * 20
                           + ["the quick brown fox jumps over the lazy dog"] * 5)


def test_tokenizer_ids_equal_transformers(vocab_folder):
    ours = CLIPTokenizer.from_folder(vocab_folder)
    ref = transformers.CLIPTokenizer.from_pretrained(str(vocab_folder))  # as SD's pipelines load it
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    captions = CAPTIONS + ["", long]
    want = ref(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(captions)
    assert torch.equal(got, want)
    assert got.shape == (len(captions), 77) and got[:, 0].eq(ours.bos_id).all()
    assert len(caught) == 1 and "cut to 77 tokens" in str(caught[0].message) and "lazy dog" in str(caught[0].message)
    assert ours.decode(got[:1]) == [CAPTIONS[0]]


def test_tokenizer_pads_as_the_folder_says(vocab_folder, tmp_path):
    """SD 2.x pads with "!" (id 0 in CLIP's vocabulary), SD 1.x with the end token."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    sd2 = CLIPTokenizer.from_folder(tmp_path)
    ids = sd2(["flag: japan"])[0]
    end = ids.tolist().index(sd2.eos_id)
    assert sd2.pad_id == 0 and ids[end + 1:].eq(0).all()
    assert CLIPTokenizer.from_folder(vocab_folder)(["flag: japan"])[0, -1].item() == sd2.eos_id


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer folder.*vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path / "tokenizer")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="merges.txt: no such file"):
        CLIPTokenizer.from_folder(tmp_path)

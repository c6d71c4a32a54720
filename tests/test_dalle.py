import json
import math

import pytest
import torch

import difflineage
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.models.clip import CLIP, CLIPConfig, contrastive_loss
from difflineage.models.dalle import (
    DalleTransformer,
    DalleTransformerConfig,
    DVAEConfig,
    filter_logits,
    gumbel_softmax,
    kl_to_uniform,
)
from difflineage.nn.bpe import CaptionTokenizer
from difflineage.nn.text import TextEncoderConfig
from difflineage.systems import load_config
from difflineage.systems.base import CarriesClip
from difflineage.train import Trainer

TINY = ["data.source=digits", "data.image_size=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
        "train.warmup_steps=0", "train.checkpoint_every=0"]
TINY_DVAE = ["model.dvae.downsample=1", "model.dvae.channels=16", "model.dvae.codes=16", "model.dvae.code_dim=8"]
TINY_CLIP = ["model.clip.embed=16", "model.clip.channels=8", "model.clip.text.width=16", "model.clip.text.depth=1",
             "model.clip.text.max_length=32"]
TINY_GPT = ["model.transformer.width=32", "model.transformer.depth=2", "model.transformer.heads=2",
            "model.transformer.text_vocab=64"]


def tiny_transformer(seed: int = 0) -> DalleTransformer:
    torch.manual_seed(seed)
    return DalleTransformer(DalleTransformerConfig(width=32, depth=2, heads=2, text_length=5, text_vocab=20),
                            image_codes=12, image_side=3).eval()


# -- dVAE -----------------------------------------------------------------------------------------------------------


def test_gumbel_softmax_is_one_hot_at_low_temperature_and_follows_the_logits():
    logits = torch.randn(4000, 5, generator=torch.Generator().manual_seed(0)) * 0 + torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(1)
    cold = gumbel_softmax(logits, tau=1 / 64, dim=1, generator=g)
    assert torch.allclose(cold.sum(1), torch.ones(4000))
    assert cold.max(1).values.mean() > 0.97 and (cold.max(1).values > 0.99).float().mean() > 0.9  # nearly one-hot
    mid = gumbel_softmax(logits, tau=1.0, dim=1, generator=g)
    assert 0.5 < mid.max(1).values.mean() < 0.9
    warm = gumbel_softmax(logits, tau=10.0, dim=1, generator=g)
    assert (warm.max(1).values < 0.5).all()  # spread out at a high temperature
    # the argmax of a Gumbel-perturbed sample is a draw from softmax(logits)
    freq = torch.bincount(cold.argmax(1), minlength=5).float() / 4000
    assert torch.allclose(freq, logits[0].softmax(0), atol=0.03)
    hard = gumbel_softmax(logits[:3], tau=1.0, dim=1, hard=True, generator=g)
    assert set(hard.flatten().tolist()) == {0.0, 1.0} and (hard.sum(1) == 1).all()


def test_kl_to_uniform_and_the_annealing_schedules():
    assert kl_to_uniform(torch.zeros(2, 8, 3, 3)).abs().max() < 1e-6  # uniform q: no KL
    peaked = torch.zeros(1, 8, 1, 1)
    peaked[0, 0] = 50.0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(8), abs=1e-4)  # one-hot q: log K
    cfg = DVAEConfig(tau_start=1.0, tau_end=1 / 16, tau_anneal=0.5, kl_weight=6.6, kl_warmup=0.2)
    assert cfg.temperature(0) == 1.0 and cfg.temperature(0.25) == pytest.approx(0.25)
    assert cfg.temperature(0.5) == pytest.approx(1 / 16) and cfg.temperature(1.0) == pytest.approx(1 / 16)
    assert cfg.beta(0) == 0 and cfg.beta(0.1) == pytest.approx(3.3) and cfg.beta(0.9) == pytest.approx(6.6)


# -- the transformer ------------------------------------------------------------------------------------------------


def test_causal_mask_later_tokens_never_change_earlier_logits():
    model = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    text, image = torch.randint(0, 20, (2, 5), generator=g), torch.randint(0, 12, (2, 9), generator=g)
    t_logits, i_logits = model(text, image)
    image2 = image.clone()
    image2[:, 4:] = (image2[:, 4:] + 1) % 12  # change image tokens 4..8
    t2, i2 = model(text, image2)
    assert torch.equal(t_logits, t2)  # text logits never see image tokens
    assert torch.allclose(i_logits[:, :5], i2[:, :5], atol=1e-6)  # predictions of tokens 0..4 read tokens < 4 only
    assert not torch.allclose(i_logits[:, 5:], i2[:, 5:], atol=1e-4)
    text2 = text.clone()
    text2[:, 3] = (text2[:, 3] + 1) % 20
    t3, _ = model(text2, image)
    assert torch.allclose(t_logits[:, :3], t3[:, :3], atol=1e-6) and not torch.allclose(t_logits[:, 3:], t3[:, 3:])


@pytest.mark.parametrize("guidance,top_k,top_p", [(1.0, 0, 1.0), (3.0, 4, 0.9)])
def test_cached_and_uncached_sampling_give_identical_tokens(guidance, top_k, top_p):
    model = tiny_transformer(1)
    text = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    null = torch.zeros_like(text)
    null[:, 0] = 1
    runs = [model.sample(text, null, guidance=guidance, top_k=top_k, top_p=top_p, temperature=0.9,
                         generator=torch.Generator().manual_seed(5), use_cache=c) for c in (True, False)]
    assert runs[0].shape == (3, 9) and runs[0].max() < 12
    assert torch.equal(runs[0], runs[1])


def test_cached_greedy_sampling_follows_the_teacher_forced_logits():
    # top-k 1 takes the argmax at each step: the cache's logits must rank tokens as the training pass does
    model = tiny_transformer(3)
    text = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(4))
    tokens = model.sample(text, top_k=1, generator=torch.Generator().manual_seed(0))
    _, logits = model(text, tokens)
    assert torch.equal(logits.argmax(-1), tokens)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]  # 0.5 + 0.3 >= 0.7
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]  # 0.8 < 0.85
    assert torch.isinf(filter_logits(logits, top_p=0.96)).tolist() == [[False, False, False, False]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]  # the top one stays


def test_text_loss_weight_splits_the_loss():
    model = tiny_transformer()
    text, image = torch.randint(2, 20, (2, 5)), torch.randint(0, 12, (2, 9))
    loss, t_nll, i_nll = model.loss(text, image)
    assert loss.item() == pytest.approx(0.125 * t_nll.item() + 0.875 * i_nll.item(), rel=1e-6)


# -- tokenizer and CLIP ---------------------------------------------------------------------------------------------


def test_bpe_tokenizer_round_trip_and_fixed_length():
    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "seven")] * 5
    tok = CaptionTokenizer.train(captions, vocab_size=64)
    ids = tok.encode(["a handwritten digit seven", "", "A Handwritten digit two and more words than fit"], 6)
    assert ids.shape == (3, 6) and (ids[:, 0] == tok.bos_id).all()
    assert (ids[1, 1:] == tok.pad_id).all()  # the empty caption: BOS and padding
    assert tok.decode(ids[:1]) == ["a handwritten digit seven"]
    assert (ids[2] != tok.pad_id).all()  # cut at the fixed length
    again = CaptionTokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(captions[:3], 6), tok.encode(captions[:3], 6))


def test_bpe_ids_are_the_same_in_every_process():
    # the library numbers its alphabet in a per-process order; the ids are renumbered canonically
    import subprocess
    import sys

    code = ("from difflineage.nn.bpe import CaptionTokenizer as T; c = ['a handwritten digit ' + w for w in "
            "('zero', 'one', 'seven', 'eight')] * 3; print(T.train(c, 64).encode(['a handwritten digit seven'], 6).tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1


def test_contrastive_loss_on_a_hand_case():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * [[1, 0.6], [0, 0.8]]: rows (images) and columns (captions) each a softmax over 2
    row = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    col = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))) / 2
    assert contrastive_loss(img, txt, scale).item() == pytest.approx((row + col) / 2, rel=1e-6)
    # two images with the same caption: both captions are positives of both images (targets 1/2, 1/2)
    same = torch.ones(2, 2, dtype=torch.bool)
    soft = contrastive_loss(img, txt, scale, same)
    logits = 2 * img @ txt.t()
    expect = (-(logits.log_softmax(1) / 2).sum(1).mean() - (logits.t().log_softmax(1) / 2).sum(1).mean()) / 2
    assert soft.item() == pytest.approx(expect.item(), rel=1e-6)


def test_reranking_keeps_the_candidate_clip_scores_highest(tmp_path):
    clip_cfg = CLIPConfig(embed=8, channels=4, text=TextEncoderConfig(width=16, depth=1, heads=2, max_length=16))
    torch.manual_seed(0)
    clip = CLIP(clip_cfg).eval()
    from difflineage.systems.dalle import DallePrior

    system = DallePrior.__new__(DallePrior)
    torch.nn.Module.__init__(system)
    system.clip = clip
    candidates = torch.rand(3, 5, 1, 8, 8) * 2 - 1
    captions = ["one", "two", "three"]
    best = system.rerank(candidates, captions)
    for i, c in enumerate(captions):
        scores = torch.stack([clip.score(candidates[i, j: j + 1], [c])[0] for j in range(5)])
        assert torch.equal(best[i], candidates[i, scores.argmax()])


# -- the three stages as a system -----------------------------------------------------------------------------------


def test_three_stages_train_sample_rerank_and_score(tmp_path):
    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=30"]), tmp_path / "dvae",
            progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "dvae" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.8 * log[0]["mse"]
    assert log[0]["tau"] == 1.0 and log[-1]["tau"] < 0.2 and log[-1]["beta"] > log[0]["beta"]  # both annealed
    assert all(float(r["codes_used"]).is_integer() and 1 <= r["codes_used"] <= 16 for r in log)  # the 16 codes
    Trainer(load_config("dalle-clip-mnist", TINY + TINY_CLIP + ["train.steps=30"]), tmp_path / "clip", progress=False).fit()
    clog = [json.loads(x) for x in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert clog[-1]["loss"] < clog[0]["loss"]
    prior = load_config("dalle-mnist", TINY + TINY_GPT + ["train.steps=25", "train.bf16=false", "train.ema_decay=0.9",
                                                         f"model.first_stage={tmp_path / 'dvae'}",
                                                         f"model.clip_stage={tmp_path / 'clip'}"])
    Trainer(prior, tmp_path / "prior", progress=False).fit()
    plog = [json.loads(x) for x in (tmp_path / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert plog[-1]["image_nll_bits_per_token"] < plog[0]["image_nll_bits_per_token"]
    system = difflineage.load(tmp_path / "prior")  # self-contained: dVAE, CLIP and tokenizer come with it
    assert system.config.model.dvae.codes == 16 and system.config.model.clip.embed == 16
    assert system.tokenizer.decode(system.text_tokens(["a handwritten digit seven"])) == ["a handwritten digit seven"]
    g = torch.Generator().manual_seed(0)
    x = system.sample(4, condition=["a handwritten digit seven"], generator=g, top_k=8, guidance=2.0)
    assert x.shape == (4, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    reranked = system.sample(2, condition=torch.tensor([3, 4]), generator=torch.Generator().manual_seed(0), rerank=3)
    assert reranked.shape == (2, 1, 8, 8)
    scores = system.evaluate(load_dataset(system.config.data, "heldout"))
    assert scores["prior_nll_bits_per_image_token"] > 0 and 0 <= scores["clip_retrieval_image_to_caption"] <= 1
    from difflineage.eval import evaluate_system

    metrics = evaluate_system(system, n=20, batch_size=10, progress=False, sample_options={"rerank": 2})
    assert 0 <= metrics["clip_score"] <= 100 and "clip_score_real" in metrics and "class_accuracy" in metrics
    # the CLIP score with a CLIP given by path (as for any caption-conditioned system), and a path that holds none
    again = evaluate_system(system, n=20, batch_size=10, progress=False, sample_options={"rerank": 2},
                            clip=tmp_path / "clip")
    assert again["clip_score"] == pytest.approx(metrics["clip_score"], rel=1e-5)
    with pytest.raises(ValueError, match="holds no CLIP"):
        evaluate_system(system, n=10, batch_size=10, progress=False, clip=tmp_path / "dvae")


def test_stage_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="model.first_stage"):
        Trainer(load_config("dalle-mnist", TINY), tmp_path, progress=False).fit()
    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=2"]), tmp_path / "dvae", progress=False).fit()
    wrong = load_config("dalle-mnist", TINY + [f"model.first_stage={tmp_path / 'dvae'}", f"model.clip_stage={tmp_path / 'dvae'}"])
    with pytest.raises(ConfigError, match="not a dalle clip checkpoint"):
        Trainer(wrong, tmp_path / "p", progress=False).fit()
    system = difflineage.load(tmp_path / "dvae")
    with pytest.raises(ValueError, match="model.stage=prior"):
        system.sample(2)
    small = load_config("dalle-mnist", TINY + TINY_GPT + [f"model.first_stage={tmp_path / 'dvae'}",
                                                          "model.transformer.text_vocab=16"])
    with pytest.raises(ConfigError, match="model.transformer.text_vocab="):
        Trainer(small, tmp_path / "small", progress=False).fit()


def test_prior_resumes_exactly(tmp_path):
    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=2"]), tmp_path / "dvae", progress=False).fit()
    cfg = load_config("dalle-mnist", TINY + TINY_GPT + ["train.steps=6", "train.bf16=false",
                                                       f"model.first_stage={tmp_path / 'dvae'}"])
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    Trainer(cfg, tmp_path / "resumed", stop_at=3, progress=False).fit()
    Trainer(None, tmp_path / "resumed", resume=True, progress=False).fit()
    a, b = difflineage.load(tmp_path / "straight", use_ema=False), difflineage.load(tmp_path / "resumed", use_ema=False)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_resumed_prior_reads_tokens_with_its_own_dvae(tmp_path):
    # the first-stage run trains on after the prior started: a resumed prior keeps modelling its own dVAE's tokens
    dvae_cfg = load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=3"])
    Trainer(dvae_cfg, tmp_path / "dvae", progress=False).fit()
    cfg = load_config("dalle-mnist", TINY + TINY_GPT + ["train.steps=4", "train.bf16=false",
                                                       f"model.first_stage={tmp_path / 'dvae'}"])
    Trainer(cfg, tmp_path / "prior", stop_at=2, progress=False).fit()
    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=6"]), tmp_path / "dvae", resume=True,
            progress=False).fit()
    trainer = Trainer(None, tmp_path / "prior", resume=True, progress=False)
    trainer.fit()
    system = trainer.system
    train = load_dataset(system.config.data, "train")
    images = train.batch(range(len(train)))["image"]
    assert torch.equal(system.first_stage.cache.compute(), system.dvae.encode(images))  # tokens of the dVAE the prior carries
    first = difflineage.load(tmp_path / "prior", use_ema=False)
    assert all(torch.equal(v, first.dvae.state_dict()[k]) for k, v in system.dvae.state_dict().items())


def test_clip_score_for_a_caption_conditioned_diffusion_model(tmp_path):
    from helpers import tiny_ddpm_dict

    from difflineage.eval import evaluate_system
    from difflineage.systems import config_from_dict

    Trainer(load_config("dalle-clip-mnist", TINY + TINY_CLIP + ["train.steps=5"]), tmp_path / "clip", progress=False).fit()
    Trainer(config_from_dict(tiny_ddpm_dict("caption")), tmp_path / "ddpm", progress=False).fit()
    ddpm = difflineage.load(tmp_path / "ddpm")
    assert ddpm.caption_conditioned and not isinstance(ddpm, CarriesClip)
    plain = evaluate_system(ddpm, n=10, batch_size=10, progress=False, bpd_images=0)
    assert "clip_score" not in plain  # no CLIP at hand: no score, rather than a made-up one
    scored = evaluate_system(ddpm, n=10, batch_size=10, progress=False, bpd_images=0, clip=tmp_path / "clip")
    assert 0 <= scored["clip_score"] <= 100 and 0 <= scored["clip_score_real"] <= 100


def test_prior_trains_from_a_store_of_dvae_tokens(tmp_path):
    """The same image tokens and captions from a latent store as from encoding the images (difflineage extract)."""
    from difflineage.config import DataConfig
    from difflineage.data.store import LatentStore, StoreDataset
    from difflineage.extract import extract

    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=2"]), tmp_path / "dvae", progress=False).fit()
    extract(str(tmp_path / "dvae"), DataConfig(source="digits", image_size=8, channels=1), tmp_path / "tokens",
            progress=False)
    cfg = load_config("dalle-mnist", TINY + TINY_GPT + ["train.steps=3", "train.bf16=false",
                                                       f"model.first_stage={tmp_path / 'dvae'}",
                                                       f"data.latents={tmp_path / 'tokens'}"])
    t = Trainer(cfg, tmp_path / "prior", progress=False)
    assert t.fit().status == "finished"
    store = StoreDataset(LatentStore.open(tmp_path / "tokens"))
    b = store.batch([0, 5])
    data = load_dataset(cfg.data, "train").batch([0, 5])
    assert b["caption"] == data["caption"] and b["caption"][0].startswith("a handwritten digit")
    images = data["image"]
    with torch.no_grad():
        assert torch.equal(t.system._tokens_of(b), t.system.dvae.encode(images).flatten(1))


def test_the_dvae_anneals_over_the_steps_its_run_started_with(tmp_path):
    """dvae.anneal_steps is filled in with train.steps when the run starts: resuming with a longer train.steps keeps
    the temperature and KL schedules where they were; a config from before the field existed anneals over
    train.steps, as it did."""
    Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=4"]), tmp_path, stop_at=2,
            progress=False).fit()
    longer = Trainer(load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=8"]), tmp_path, resume=True,
                     progress=False)
    assert longer.fit().step == 8
    assert longer.config.model.dvae.anneal_steps == 4
    assert longer.system.training_progress(2) == pytest.approx(0.5)  # 2 of the run's 4 steps, not of 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dvae = longer.config.model.dvae
    assert [r["tau"] for r in rows] == pytest.approx([dvae.temperature(min(1.0, s / 4)) for s in range(8)])
    legacy = load_config("dalle-dvae-mnist", TINY + TINY_DVAE + ["train.steps=8", "model.dvae.anneal_steps=null"])
    from difflineage.systems import build_system

    assert build_system(legacy).training_progress(2) == pytest.approx(2 / 8)

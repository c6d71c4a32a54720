import json

import pytest
import torch

import difflineage
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.systems import load_config
from difflineage.train import Trainer

TINY = ["data.source=digits", "data.image_size=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
        "train.warmup_steps=0",
        "train.checkpoint_every=0"]


def test_two_stages_train_sample_and_score(tmp_path):
    ae_cfg = load_config("vqvae-mnist", TINY + ["train.steps=30", "model.vq.downsample=1", "model.vq.channels=16",
                                                 "model.vq.codes=16", "model.vq.code_dim=8", "model.vq.restart_after=5"])
    Trainer(ae_cfg, tmp_path / "ae", progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "ae" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.7 * log[0]["mse"]  # reconstruction improves
    assert {"perplexity", "codes_used"} <= set(log[-1]) and 1 <= log[-1]["codes_used"] <= 16
    prior_cfg = load_config("vqvae-prior-mnist", TINY + ["train.steps=20", f"model.first_stage={tmp_path / 'ae'}",
                                                          "model.prior.channels=16", "model.prior.layers=2"])
    Trainer(prior_cfg, tmp_path / "prior", progress=False).fit()
    plog = [json.loads(x) for x in (tmp_path / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert plog[-1]["nll_bits_per_code"] < plog[0]["nll_bits_per_code"]  # the prior learns the codes
    system = difflineage.load(tmp_path / "prior")
    assert system.config.model.vq.codes == 16  # the first stage's architecture was read into the config
    g = torch.Generator().manual_seed(0)
    x = system.sample(6, condition=torch.tensor([0, 1, 2, 3, 4, 5]), generator=g, temperature=0.5)
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    scores = system.evaluate(load_dataset(system.config.data, "heldout"))
    assert scores["prior_nll_bits_per_code"] > 0 and 1 <= scores["codes_used"] <= 16
    assert scores["prior_nll_bits_per_dim"] == pytest.approx(scores["prior_nll_bits_per_code"] * 16 / 64)


def test_prior_stage_needs_an_autoencoder_run(tmp_path):
    with pytest.raises(ConfigError, match="model.first_stage"):
        Trainer(load_config("vqvae-prior-mnist", TINY), tmp_path, progress=False).fit()


def test_vqvae2_two_levels_train_sample_and_score(tmp_path):
    ae = load_config("vqvae2-mnist", TINY + ["train.steps=20", "data.image_size=16", "model.vq.downsample=1",
                                              "model.vq.channels=16", "model.vq.codes=16", "model.vq.code_dim=8"])
    Trainer(ae, tmp_path / "ae", progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "ae" / "metrics.jsonl").read_text().splitlines()]
    assert {"perplexity_top", "perplexity_bottom", "codes_used_top", "codes_used_bottom"} <= set(log[-1])
    prior = load_config("vqvae2-prior-mnist", TINY + ["train.steps=10", "data.image_size=16", f"model.first_stage={tmp_path / 'ae'}",
                                                      "model.prior.channels=16", "model.prior.layers=2",
                                                      "model.top_prior_layers=3"])
    Trainer(prior, tmp_path / "prior", progress=False).fit()
    system = difflineage.load(tmp_path / "prior")
    assert (len(system.prior.layers), len(system.prior_bottom.layers)) == (3, 2)  # the deeper top prior
    top, bottom = system.vqvae.encode(torch.zeros(2, 1, 16, 16))
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8)  # top codes at half the bottom's side
    x = system.sample(3, condition=torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16)
    # the bottom prior reads the top codes: changing them changes its predictions
    cond_a, cond_b = system.top_cond(top), system.top_cond((top + 1) % 16)
    assert not torch.equal(system.prior_bottom(bottom, torch.tensor([1, 1]), cond_a),
                           system.prior_bottom(bottom, torch.tensor([1, 1]), cond_b))
    scores = system.evaluate(load_dataset(system.config.data, "heldout"))
    assert scores["prior_nll_bits_per_dim"] > 0 and scores["codes_used_top"] >= 1

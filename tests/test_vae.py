import math

import pytest
import torch
from helpers import tiny_vae, tiny_vae_dict

from difflineage.nn.distributions import discretized_gaussian_log_likelihood, gaussian_kl_standard
from difflineage.systems import VAESystem, config_from_dict


def test_elbo_matches_a_hand_computation():
    """Two pixels, one latent: encoder and decoder replaced by known numbers, ELBO worked out by hand."""
    vae = VAESystem(tiny_vae())
    vae.vae.encode = lambda x, label=None: (torch.tensor([[0.5]]), torch.tensor([[math.log(0.25)]]))
    vae.vae.decode = lambda z, label=None: torch.stack([z * 2.0, -z]).view(1, 2)  # logits
    x = torch.tensor([[1.0, 0.0]])
    rec, kl = vae.elbo_terms(x, None, eps=torch.tensor([[1.0]]))
    # z = mu + sigma * eps = 0.5 + 0.5 * 1 = 1; logits (2, -1); x = (1, 0)
    # log p(x|z) = log sigmoid(2) + log(1 - sigmoid(-1)) = log sigmoid(2) + log sigmoid(1)
    hand_rec = math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(-1)))
    # KL(N(0.5, 0.25) || N(0, 1)) = 0.5 * (mu^2 + var - 1 - log var)
    hand_kl = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    assert rec.item() == pytest.approx(hand_rec, abs=1e-6)
    assert kl.item() == pytest.approx(hand_kl, abs=1e-6)


def test_gaussian_kl_is_zero_only_at_the_prior():
    assert gaussian_kl_standard(torch.zeros(3), torch.zeros(3)).abs().max() < 1e-7
    assert (gaussian_kl_standard(torch.tensor([0.3]), torch.tensor([0.2])) > 0).all()


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.arange(256).float() / 127.5 - 1.0
    for mean, log_scale in ((0.0, -1.0), (0.7, -3.0), (-1.2, 0.5)):
        logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_loss_is_negative_elbo_and_reports_bits_per_dim():
    """The training loss of the real (random) network against the negative ELBO written out here: images already
    binary in {-1, 1}, so the observed x is (image + 1) / 2 and the encoder sees the image itself; eps redrawn
    from the same seed; Bernoulli log-likelihood and closed-form Gaussian KL spelled out, averaged over images."""
    vae = VAESystem(_resolved(binarize="threshold"))
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(4, 1, 8, 8, generator=g) > 0.6).float() * 2 - 1
    batch = {"image": image, "label": None, "caption": None}
    torch.manual_seed(11)
    loss, m = vae.loss(batch)
    torch.manual_seed(11)
    eps = torch.randn(4, 4)  # one reparameterised sample per image, latent_dim 4
    with torch.no_grad():
        mu, logvar = vae.vae.encode(image)
        logits = vae.vae.decode(mu + torch.exp(0.5 * logvar) * eps).flatten(1)
        x = ((image + 1) / 2).flatten(1)
        p = torch.sigmoid(logits.double())
        log_px = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(1)  # Bernoulli, summed over the 64 pixels
        kl = 0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double()).sum(1)  # KL(N(mu, var) || N(0, I))
    assert m["recon_nats"].item() == pytest.approx(-log_px.mean().item(), rel=1e-5)
    assert m["kl_nats"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx((kl - log_px).mean().item(), rel=1e-5)  # nats per image
    assert m["bits_per_dim"].item() == pytest.approx(loss.item() / (64 * math.log(2)), rel=1e-5)


def test_importance_weighted_bound_is_tighter_than_elbo():
    from difflineage.config import DataConfig
    from difflineage.data import load_dataset

    vae = VAESystem(_resolved()).eval()
    held = load_dataset(DataConfig(source="digits", image_size=8), "heldout").subset(range(20))
    r = vae.evaluate(held, generator=torch.Generator().manual_seed(0), k=16, progress=False)
    assert r["nll_iw_nats"] <= r["neg_elbo_nats"]
    assert r["images"] == 20 and r["iw_samples"] == 16
    r1 = vae.evaluate(held, generator=torch.Generator().manual_seed(0), k=1, progress=False)
    assert r1["nll_iw_nats"] == pytest.approx(r1["neg_elbo_nats"], rel=1e-6)  # k = 1: the bound is the ELBO


def _resolved(**model):
    d = tiny_vae_dict()
    d["data"]["num_classes"] = 10
    d["model"].update(model)
    return config_from_dict(d)


def test_sampling_shapes_range_and_conditioning():
    vae = VAESystem(_resolved(conditional=True)).eval()
    x = vae.sample(12, generator=torch.Generator().manual_seed(0))
    assert x.shape == (12, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    a = vae.sample(5, condition=3, generator=torch.Generator().manual_seed(0))
    b = vae.sample(5, condition=4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)  # the label reaches the decoder
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        vae.sample(2, condition=12)


def test_latent_manifold_needs_2d_latent():
    vae = VAESystem(_resolved(latent_dim=2)).eval()
    assert vae.latent_manifold(5).shape == (25, 1, 8, 8)
    with pytest.raises(ValueError, match="latent_dim=2"):
        VAESystem(_resolved(latent_dim=3)).latent_manifold(5)


def test_discretized_gaussian_vae_trains_a_step():
    vae = VAESystem(_resolved(likelihood="discretized_gaussian"))
    batch = {"image": torch.randint(0, 256, (4, 1, 8, 8)).float() / 127.5 - 1, "label": torch.zeros(4, dtype=torch.long),
             "caption": None}
    loss, m = vae.loss(batch)
    loss.backward()
    assert vae.vae.log_scale.grad is not None and torch.isfinite(loss)

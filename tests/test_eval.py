import math

import numpy as np
import pytest
import torch

from difflineage.eval import generate, quantise
from difflineage.eval.flops import count_flops
from difflineage.eval.metrics import (
    frechet_distance,
    gaussian_frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def test_frechet_distance_by_hand_on_small_gaussians():
    # Four points with mean 0, unbiased variances 4/3 and 16/3, no covariance; the second set is the
    # first doubled and shifted by (3, 0): mean (3, 0), variances 16/3 and 64/3.
    real = torch.tensor([[-1.0, -2.0], [1.0, 2.0], [-1.0, 2.0], [1.0, -2.0]])
    fake = real * 2 + torch.tensor([3.0, 0.0])
    # |mu_r - mu_f|^2 = 9; for diagonal covariances the trace term is sum (sqrt(a) - sqrt(b))^2
    hand = 9 + (math.sqrt(4 / 3) - math.sqrt(16 / 3)) ** 2 + (math.sqrt(16 / 3) - math.sqrt(64 / 3)) ** 2
    assert frechet_distance(real, fake) == pytest.approx(hand, rel=1e-9)


def test_frechet_distance_matches_the_formula_with_full_covariances():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64)
    b = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.5
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    hand = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(hand, rel=1e-6)


def test_fid_of_identical_sets_is_zero():
    x = torch.randn(500, 16)
    assert abs(frechet_distance(x, x)) < 1e-6
    assert frechet_distance(x, x + 0.1) > 0.1


def test_kid_near_zero_for_the_same_distribution_and_large_for_another():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=300)
    shifted, _ = kernel_inception_distance(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 0.05 and shifted > 20 * abs(same) and shifted > 0.5


def test_inception_score_bounds():
    assert inception_score(torch.zeros(100, 10), splits=5)[0] == pytest.approx(1.0)  # no confidence: IS = 1
    confident = torch.eye(10).repeat(10, 1) * 50  # sure of each of 10 classes, equally often
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)  # one split: p(y) uniform


def test_precision_recall_on_constructed_point_clouds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 2, generator=g)
    pr = lambda a, b: precision_recall(a, b, dtype=torch.float64)  # noqa: E731 - the digit evaluation's distances
    assert pr(real, real) == (1.0, 1.0)
    far = torch.randn(500, 2, generator=g) + 100
    assert pr(real, far) == (0.0, 0.0)
    # Mode collapse: every sample sits near the real points closest to the centre: realistic, not diverse.
    near_centre = real[real.norm(dim=1).argsort()[:50]]
    collapsed = near_centre.repeat(10, 1) + 0.01 * torch.randn(500, 2, generator=g)
    p, r = pr(real, collapsed)
    assert p > 0.95 and r < 0.3


def test_precision_recall_is_the_share_inside_the_other_sets_k_nn_balls():
    """Against the definition written out with Euclidean distances (torch.cdist), in each distance precision."""
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g) * 1.2 + 0.2

    def share_inside(points, support, k=3):
        radius = torch.cdist(support, support).kthvalue(k + 1, dim=1).values  # k + 1: each point is its own nearest
        return (torch.cdist(points, support) <= radius[None]).any(1).double().mean().item()

    want = (share_inside(fake.double(), real), share_inside(real, fake.double()))
    assert precision_recall(real, fake, dtype=torch.float64) == want
    for dtype in (torch.float32, torch.float16):  # a tie or two may round the other way
        assert precision_recall(real, fake, dtype=dtype) == pytest.approx(want, abs=0.01)


def test_precision_recall_fp16_matches_fp32_on_well_scaled_features():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1, size=(200, 16))
    p16, r16 = precision_recall(a, b, dtype=torch.float16)
    p32, r32 = precision_recall(a, b, dtype=torch.float32)
    assert abs(p16 - p32) < 0.02 and abs(r16 - r32) < 0.02 and 0 < p32 < 1


def test_inception_score_splits_and_frechet_distance_by_hand():
    # two splits of one-hot predictions over 2 classes: p(y) uniform, KL = log 2 each, IS = 2
    logits = np.array([[50.0, 0], [0, 50.0]] * 4)
    assert inception_score(logits, split_size=4)[0] == pytest.approx(2.0, rel=1e-6)
    # Gaussians N(0, I) and N(1, 4I) in 2-D: |mu|^2 + tr(I + 4I - 2 * 2I) = 2 + 2 = 4
    assert gaussian_frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(4.0)


@pytest.mark.filterwarnings("ignore:Metric .* will save all extracted features")
def test_fid_kid_and_is_agree_with_torchmetrics():
    """The peer: torchmetrics' FID, KID and Inception Score fed the same features (KID's subsets and IS's shuffle
    drawn from the same seed), to floating-point noise."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    class Given(torch.nn.Module):  # lets torchmetrics take features computed elsewhere
        def __init__(self, num_features):
            super().__init__()
            self.num_features = num_features

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(120, 8, generator=g).double(), (torch.randn(90, 8, generator=g) * 1.3 + 0.4).double()
    logits = torch.randn(95, 10, generator=g).double() * 3
    fid = FrechetInceptionDistance(feature=Given(8))
    kid = KernelInceptionDistance(feature=Given(8), subsets=7, subset_size=50)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    score = InceptionScore(feature=Given(10), splits=10)
    score.update(logits)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        kid_mean, kid_std = kid.compute()
        torch.manual_seed(5)
        is_mean, is_std = score.compute()
    assert frechet_distance(real, fake) == pytest.approx(float(fid.compute()), rel=1e-9)
    assert kernel_inception_distance(real, fake, subsets=7, subset_size=50, seed=5) == \
        pytest.approx((float(kid_mean), float(kid_std)), rel=1e-9)
    assert inception_score(logits, splits=10, seed=5) == pytest.approx((float(is_mean), float(is_std)), rel=1e-9)


def test_flop_counter_linear_and_conv_by_hand():
    linear = torch.nn.Linear(7, 5)
    # (3 x 7) @ (7 x 5): 3 * 7 * 5 multiply-accumulates
    c = count_flops(linear, torch.randn(3, 7))
    assert c.macs == 105 and c.flops == 210
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    # every output value (4 x 8 x 8) sums 3 x 3 x 3 products
    assert count_flops(conv, torch.randn(1, 3, 8, 8)).macs == 4 * 8 * 8 * 3 * 3 * 3
    strided = torch.nn.Conv2d(2, 6, 4, stride=2, padding=1)  # output 6 x 4 x 4, each 2 x 4 x 4 products
    assert count_flops(strided, torch.randn(2, 2, 8, 8)).macs == 2 * 6 * 4 * 4 * 2 * 4 * 4


def test_flop_counter_counts_attention_on_the_cpu():
    import torch.nn.functional as F

    q = k = v = torch.randn(1, 2, 16, 8)  # 2 heads, 16 tokens, 8 channels per head
    # scores q k^T: 16 x 16 dot products of length 8; weighted sum of v: 16 x 8 outputs of length 16 (per head)
    assert count_flops(F.scaled_dot_product_attention, q, k, v).macs == 2 * (16 * 16 * 8 + 16 * 8 * 16)


def test_generate_is_deterministic_and_balances_classes():
    from helpers import tiny_vae_dict

    from difflineage.systems import VAESystem, config_from_dict

    d = tiny_vae_dict()
    d["data"]["num_classes"] = 10
    d["model"]["conditional"] = True
    vae = VAESystem(config_from_dict(d)).eval()
    a, la = generate(vae, 23, batch_size=5, seed=3, progress=False)
    b, lb = generate(vae, 23, batch_size=5, seed=3, progress=False)
    assert a.dtype == torch.uint8 and a.shape == (23, 1, 8, 8) and torch.equal(a, b)
    assert la.tolist() == [i % 10 for i in range(23)]
    assert torch.equal(quantise(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0, 128, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="does not take these sampling options"):
        generate(vae, 4, guidance=2.0, progress=False)


def test_class_accuracy_is_only_scored_where_the_classes_are_digits():
    from difflineage.config import DataConfig

    assert DataConfig(source="mnist5k").holds_digits() and DataConfig(source="mnist-idx:/data/mnist").holds_digits()
    assert not DataConfig(source="mnist-idx:/data/fashion-mnist").holds_digits()
    assert not DataConfig(source="folder:/data/shapes").holds_digits()

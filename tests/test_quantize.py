import pytest
import torch

from difflineage.nn.quantize import VectorQuantizer


def two_codes(**kw) -> VectorQuantizer:
    vq = VectorQuantizer(codes=2, dim=2, **kw)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        if vq.ema:
            vq.ema_sum.copy_(vq.embedding.weight)
    return vq


def hand_batch(requires_grad: bool = True) -> torch.Tensor:
    """Two vectors as a (1, 2, 1, 2) map: (0.2, 0) -> code 0, (0.9, 1.2) -> code 1."""
    z = torch.tensor([[0.2, 0.0], [0.9, 1.2]]).t().reshape(1, 2, 1, 2).clone()
    return z.requires_grad_(requires_grad)


def test_nearest_codes_and_the_two_losses_on_a_hand_case():
    vq = two_codes().eval()
    z = hand_batch()
    out = vq(z)
    assert out.indices.tolist() == [[[0, 1]]]
    # mean squared distance to the chosen codes: (0.2^2 + 0 + 0.1^2 + 0.2^2) / 4
    assert out.codebook_loss.item() == pytest.approx(0.0225)
    assert out.commitment_loss.item() == pytest.approx(0.0225)
    assert out.loss.item() == pytest.approx(0.0225 * 1.25)
    # the codebook loss moves only the codes, the commitment loss only the encoder output
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and vq.embedding.weight.grad.abs().sum() > 0
    vq.embedding.weight.grad = None
    out.commitment_loss.backward()
    assert z.grad.abs().sum() > 0 and (vq.embedding.weight.grad is None or vq.embedding.weight.grad.abs().sum() == 0)


def test_straight_through_gradient_reaches_the_encoder_unchanged():
    vq = two_codes().eval()
    z = hand_batch()
    out = vq(z)
    assert torch.equal(out.quantized.detach(), torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2))
    w = torch.randn_like(z)
    (out.quantized * w).sum().backward()
    assert torch.equal(z.grad, w)  # d quantized / d z is the identity


def test_ema_update_arithmetic():
    vq = two_codes(ema=True, decay=0.5, eps=0.0).train()
    z = hand_batch(requires_grad=False)
    out = vq(z)
    assert out.codebook_loss.item() == 0.0  # EMA: no codebook loss, the codes follow the averages
    # counts start at 1 (one vector's worth for the initial code): N = 0.5 * 1 + 0.5 * 1 per code; sums
    # m = 0.5 * e_old + 0.5 * z_assigned; e = m / N (eps 0: no smoothing)
    expected = torch.tensor([[0.5 * 0.0 + 0.5 * 0.2, 0.5 * 0.0 + 0.5 * 0.0], [0.5 * 1 + 0.5 * 0.9, 0.5 * 1 + 0.5 * 1.2]])
    assert torch.allclose(vq.ema_count, torch.tensor([1.0, 1.0]))
    assert torch.allclose(vq.codebook, expected)
    assert not vq.embedding.weight.requires_grad


def test_an_ema_code_no_batch_picks_stays_within_reach():
    """With the counts started at zero an unpicked code became m / eps, about 1e5 times its size after one update,
    and no encoder output came near it again; it now decays toward its initial value."""
    torch.manual_seed(0)
    vq = VectorQuantizer(codes=16, dim=4, ema=True).train()
    start = vq.codebook.clone()
    z = torch.randn(8, 4, 2, 2) * 0.01 + vq.codebook[0].view(1, 4, 1, 1)  # every vector nearest code 0
    for _ in range(3):
        vq(z)
    assert vq(z).used.item() == 1
    assert vq.codebook[1:].norm(dim=1).max() <= 1.01 * start[1:].norm(dim=1).max()


def test_dead_codes_are_restarted_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(codes=8, dim=3, restart_after=2).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(8, 3) * 0.01 + 10)  # every code far away ...
        vq.embedding.weight[0] = 0.0  # ... except code 0, nearest to every input
    z = torch.randn(4, 3, 5, 5)
    assert vq(z).used.item() == 1 and vq.idle_steps[1:].eq(1).all()
    vq(z)  # second step without use: codes 1-7 are re-seeded from this batch's vectors
    assert vq.idle_steps.eq(0).all()
    flat = z.movedim(1, -1).reshape(-1, 3)
    dist = torch.cdist(vq.codebook[1:].detach(), flat).min(1).values
    assert (dist < 0.05).all()  # each restarted code sits on an encoder output
    assert vq(z).used.item() > 1


def test_perplexity_counts_equally_used_codes():
    vq = VectorQuantizer(codes=4, dim=1).eval()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    out = vq(torch.tensor([0.0, 1.0, 2.0, 3.0, 0.1, 1.1, 2.1, 3.1]).view(1, 1, 8))
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-5) and out.used.item() == 4
    out = vq(torch.zeros(1, 1, 8))
    assert out.perplexity.item() == pytest.approx(1.0, abs=1e-5) and out.used.item() == 1


def test_wrong_width_is_a_clear_error():
    with pytest.raises(ValueError, match="expects 2 channels"):
        two_codes()(torch.zeros(1, 3, 4, 4))

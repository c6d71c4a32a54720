import pytest
import torch
import torch.nn.functional as F

from difflineage.nn.attention import SMALL_SCORES, Attention, attention


@pytest.mark.parametrize("tokens", [16, 256])
def test_low_precision_cpu_path_matches_the_fused_kernel(tokens):
    """Short bf16 sequences on the CPU take the explicit product: as close to the fp32 result as SDPA in bf16."""
    assert 2 * 3 * tokens * tokens <= SMALL_SCORES
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, tokens, 32, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, tokens, generator=g) > 0.3
    mask[..., 0] = True  # every query can attend somewhere
    for m in (None, mask):
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        ours = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m).float()
        fused = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=m).float()
        # as close to the fp32 result as the fused bf16 kernel is (bf16 keeps about 3 significant digits)
        assert (ours - exact).abs().max() <= 2 * (fused - exact).abs().max() + 1e-2
        assert torch.allclose(attention(q, k, v, m), exact, atol=1e-6)  # fp32 goes to SDPA unchanged


def test_low_precision_path_has_gradients_like_fp32():
    layer = Attention(64, 4)
    x = torch.randn(4, 32, 64, requires_grad=True)
    layer(x).square().sum().backward()
    exact = x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    assert torch.nn.functional.cosine_similarity(x.grad.flatten(), exact.flatten(), dim=0) > 0.999

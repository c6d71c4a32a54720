import pytest
import torch

from difflineage.eval.flops import count_flops
from difflineage.models.dit import BLOCK_TYPES, DIT_CONFIGS, DiT, DiTBlock, DiTConfig, sincos_pos_embed_2d

# The paper's Table 4, Gflops (multiply-accumulates) at 256 x 256 images = 32 x 32 x 4 latents.
PAPER_GFLOPS = {"DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
                "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05,
                "DiT-XL/2": 118.64}


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_every_named_config_has_the_papers_shape_and_gflops(name):
    with torch.device("meta"):  # no memory for the weights: shapes and arithmetic only
        model = DiT(DiTConfig(name=name), in_channels=4, input_size=32, num_classes=1000)
        x, t, y = torch.empty(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        assert model(x, t, y).shape == (1, 8, 32, 32)  # learned sigma: 2C output channels
        gmacs = count_flops(model, x, t, y).gmacs
    assert gmacs == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def test_official_key_layout_of_dit_xl_2():
    with torch.device("meta"):
        keys = DiT(DiTConfig(name="DiT-XL/2"), 4, 32, 1000).state_dict()
    assert len(keys) == 292  # as the released DiT-XL-2-256x256.pt
    for k in ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
              "y_embedder.embedding_table.weight", "blocks.27.attn.qkv.weight", "blocks.0.attn.proj.bias",
              "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
              "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"):
        assert k in keys, k
    assert keys["y_embedder.embedding_table.weight"].shape == (1001, 1152)  # the last row is the null class
    assert keys["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert keys["pos_embed"].shape == (1, 256, 1152)


def small(block="adaln_zero", **kw):
    return DiT(DiTConfig(depth=2, hidden=32, heads=2, patch=2, block=block, **kw), in_channels=4, input_size=8,
               num_classes=10)


@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_all_four_block_designs_run_and_read_the_condition(block):
    torch.manual_seed(0)
    model = small(block)
    for p in model.parameters():  # leave the zero-initialised start so that conditions show in the output
        if p.requires_grad and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    a, b = model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2]))
    assert a.shape == (2, 8, 8, 8) and not torch.allclose(a, b)
    assert not torch.allclose(model(x, torch.tensor([500, 500]), torch.tensor([1, 1])), a)


def test_a_fresh_adaln_zero_block_is_the_identity_and_a_fresh_dit_predicts_zero():
    torch.manual_seed(0)
    model = small()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[0](x, c), x)
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 10])).abs().max() == 0
    # the plain adaLN block has no gates and a non-zero regressor: it changes x from the start
    adaln = DiTBlock(32, 2, 4.0, "adaln")
    assert not torch.allclose(adaln(x, c), x)


def test_positions_are_the_fixed_2d_sincos_table():
    pos = sincos_pos_embed_2d(8, 4)
    assert pos.shape == (16, 8)
    # the first half encodes the column: tokens in one column share it; the second half encodes the row
    assert (pos[0, :4] == pos[4, :4]).all() and (pos[0, 4:] == pos[1, 4:]).all()
    assert pos[0, 0] == 0.0 and pos[0, 2] == 1.0  # sin(0), cos(0)
    model = small()
    assert not model.pos_embed.requires_grad and torch.allclose(model.pos_embed[0], torch.from_numpy(sincos_pos_embed_2d(32, 4)).float())


def test_unpatchify_inverts_patchify():
    model = small()
    x = torch.randn(2, 8, 8, 8)  # as many channels as the output
    p = 2
    tokens = x.view(2, 8, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 8)
    assert torch.equal(model.unpatchify(tokens), x)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = small(grad_checkpointing=False)
    b = small(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    for p in list(a.parameters()) + list(b.parameters()):
        if p.requires_grad and p.abs().max() == 0:
            torch.nn.init.constant_(p, 0.01)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    assert torch.allclose(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_compiled_gelu_is_the_tanh_gelu_in_value_and_gradient(dtype, tol):
    from difflineage.nn.activations import gelu_tanh

    # the compiled form (x * sigmoid(2u)) is taken only while torch.compile traces; aot_eager traces it, with
    # autograd, without building C++ kernels
    compiled = torch.compile(gelu_tanh, backend="aot_eager", fullgraph=True)
    x = torch.cat([torch.linspace(-30, 30, 601), torch.randn(1000)]).to(dtype).requires_grad_(True)
    ref = x.detach().clone().requires_grad_(True)
    y, y_ref = compiled(x), torch.nn.functional.gelu(ref, approximate="tanh")
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    (y * torch.cos(x)).sum().backward()
    (y_ref * torch.cos(ref)).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=tol, atol=tol)


def test_a_compiled_dit_matches_the_eager_one():
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=2, hidden=64, heads=4), in_channels=4, input_size=8, num_classes=10)
    for p in model.parameters():  # past the zero init, so every layer shapes the output
        torch.nn.init.normal_(p, std=0.05)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)

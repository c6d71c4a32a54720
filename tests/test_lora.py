"""LoRA adapters on the attention projections: start as the frozen network, train only themselves, save alone, merge
into the same function, and mean what separate q/k/v adapters mean."""

import torch

from difflineage.interop.sd_unet import config_from_diffusers
from difflineage.models.unet import SpatialTransformer, UNet
from difflineage.nn.attention import Attention
from difflineage.nn.lora import LoRALinear, add_lora, lora_state_dict, merge_lora

TINY_SD = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4,
               block_out_channels=[32, 64], layers_per_block=1,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16, attention_head_dim=4,
               norm_num_groups=8)


def _unet() -> UNet:
    torch.manual_seed(0)
    cfg, io = config_from_diffusers(TINY_SD)
    model = UNet(cfg, 4, 4, 8, context_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_adapters_start_as_the_frozen_network_and_train_alone():
    model = _unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x, t, context=ctx)
    n = add_lora(model, rank=2, only=[SpatialTransformer])
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert n == sum(3 if a.cross else 2 for a in attns)  # qkv and proj; q, kv and proj in a cross-attention
    with torch.no_grad():
        assert torch.equal(model(x, t, context=ctx), before)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_a." in k or ".lora_b." in k for k in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    for _ in range(3):
        loss = model(x, t, context=ctx).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)
    with torch.no_grad():
        tuned = model(x, t, context=ctx)
    assert not torch.allclose(tuned, before)
    saved = lora_state_dict(model)
    assert saved and all("lora" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in _unet().parameters())
    # merged: the plain network again, computing what the adapted one computed
    assert merge_lora(model) == n
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert (model(x, t, context=ctx) - tuned).abs().max().item() < 1e-5


def test_stacked_adapter_is_separate_qkv_adapters():
    """One adapter on the stacked qkv projection = three adapters on q, k and v."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(8, 24)
    lora = LoRALinear(lin, rank=2, alpha=4.0, parts=3)
    with torch.no_grad():
        for b in lora.lora_b:
            b.normal_()
    x = torch.randn(5, 8)
    want = torch.cat([lin.weight[i * 8:(i + 1) * 8] @ x.T + lin.bias[i * 8:(i + 1) * 8, None]
                      + 2.0 * lora.lora_b[i] @ (lora.lora_a[i] @ x.T) for i in range(3)]).T
    assert torch.allclose(lora(x), want, atol=1e-5)

import json

import pytest
import torch
from test_dit_system import tiny_dit_dict

import difflineage
from difflineage.errors import CheckpointError, ConfigError
from difflineage.eval.flops import count_flops
from difflineage.models.dit import DiT, DiTConfig
from difflineage.models.dydit import DyDiT, DyDiTConfig, route
from difflineage.systems import config_from_dict
from difflineage.train import Trainer


def random_dydit(tokens: bool = True, width: bool = True, std: float = 0.05, seed: int = 0) -> DyDiT:
    """depth 3, hidden 64, 4 heads, 16 tokens; every weight random, so routers switch units on and off."""
    torch.manual_seed(seed)
    m = DyDiT(DiTConfig(depth=3, hidden=64, heads=4, patch=2), 4, 8, 10, dynamic=DyDiTConfig(width=width, tokens=tokens))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return m.eval()


def inputs(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_router_shapes_follow_the_released_layout():
    m = random_dydit()
    state = m.state_dict()
    assert state["blocks.0.attn_rate.router.weight"].shape == (3, 64)  # H - 1 heads routed
    assert state["blocks.2.mlp_rate.router.bias"].shape == (3,)
    assert state["blocks.1.token_selection.mlp_head.0.weight"].shape == (4, 64)  # D / 16
    assert state["blocks.1.token_selection.mlp_head.2.weight"].shape == (1, 4)
    fresh = DyDiT(DiTConfig(depth=2, hidden=64, heads=4, patch=2), 4, 8, 10)
    x, y = inputs()
    _, usage = fresh.eval()(x, torch.full((6,), 500), y, return_usage=True)
    assert all(bool((v == 1).all()) for v in usage.values())  # routers start with every unit on
    assert usage["heads"].shape == (6, 2)


def test_straight_through_gradient_is_the_soft_relaxations():
    logits = torch.tensor([[-3.0, -0.2, 0.1, 4.0]], requires_grad=True)
    torch.manual_seed(7)
    hard = route(logits, tau=5.0, train=True)
    torch.manual_seed(7)  # the same noise, by hand
    u = torch.rand((2, 1, 4)).clamp_(1e-10, 1 - 1e-7)
    g = -torch.log(-torch.log(u))
    soft = torch.sigmoid((logits.detach() + g[0] - g[1]) / 5.0)
    assert torch.equal(hard.detach(), (soft > 0.5).float())  # forward: hard decisions
    hard.sum().backward()
    assert torch.allclose(logits.grad, soft * (1 - soft) / 5.0, atol=1e-7)  # backward: the sigmoid's slope
    assert torch.equal(route(logits.detach(), 5.0, train=False), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


def test_flops_ratio_matches_a_hand_count_and_the_counter():
    m = random_dydit()
    t_tok, d, mlp = 16, 64, 256
    attn_macs, mlp_macs = 4 * t_tok * d * d + 2 * t_tok * t_tok * d, 2 * t_tok * d * mlp
    assert m.block_macs() == (attn_macs, mlp_macs)
    # the counter agrees on one plain DiT block (attention + MLP; the adaLN regression is not routed)
    dit = DiT(DiTConfig(depth=1, hidden=64, heads=4, patch=2), 4, 8, 10)
    x = torch.randn(1, 16, 64)
    counted = count_flops(lambda: dit.blocks[0].attn(x)).macs + count_flops(lambda: dit.blocks[0].mlp(x)).macs
    assert counted == attn_macs + mlp_macs
    # the rest of the network (embedders, adaLN regressions, final layer), against the counter on the full model
    static = m.static_macs()
    assert static + 3 * (attn_macs + mlp_macs) == count_flops(lambda: m(*_one(), mode="full")).macs
    usage = {"heads": torch.tensor([[1.0, 0.5, 0.25]]), "groups": torch.tensor([[1.0, 0.75, 0.25]]),
             "tokens": torch.tensor([[1.0, 0.5, 1.0]])}
    kept = attn_macs * (1 + 0.5 + 0.25) + mlp_macs * (1 * 1 + 0.75 * 0.5 + 0.25 * 1)
    expected = (static + kept) / (static + 3 * (attn_macs + mlp_macs))
    assert m.flops_ratio(usage).item() == pytest.approx(expected, rel=1e-6)


def _one():
    x, y = inputs(1)
    return x, torch.tensor([10]), y


def test_ranking_units_by_importance_changes_nothing():
    m = random_dydit()
    x, y = inputs()
    t = torch.tensor([3, 3, 400, 400, 999, 3])
    before = m(x, t, y, mode="full")
    m.rank_units_by_importance()
    assert torch.allclose(m(x, t, y, mode="full"), before, atol=1e-6)
    blk = m.blocks[0]
    head_mag = blk.attn.qkv.weight.abs().view(3, 4, 16, 64).sum(dim=(0, 2, 3)) + \
        blk.attn.proj.weight.abs().view(64, 4, 16).sum(dim=(0, 2))
    assert int(head_mag.argmax()) == 0  # the always-on head is the most important one
    ch = blk.mlp.fc1.weight.abs().sum(1) + blk.mlp.fc2.weight.abs().sum(0)
    assert bool((ch[:-1] >= ch[1:]).all())  # channels sorted: group 0 holds the strongest


@pytest.mark.parametrize("tokens", [True, False])
def test_fast_path_equals_the_masked_reference(tokens):
    m = random_dydit(tokens=tokens)
    x, y = inputs()
    t = torch.tensor([5, 5, 900, 900, 300, 5])  # three timesteps in one batch: grouped by timestep
    with torch.no_grad():
        ref, u_ref = m(x, t, y, mode="masked", return_usage=True)
        fast, u_fast = m(x, t, y, mode="fast", return_usage=True)
    assert (fast - ref).abs().max().item() < 1e-5
    for k in u_ref:
        assert torch.allclose(u_fast[k], u_ref[k])
    assert 0.2 < m.flops_ratio(u_ref).mean().item() < 0.9  # the check runs with units really off
    # and the fast path really computes less: counted arithmetic against the masked path
    same_t = torch.full((6,), 5)
    assert count_flops(lambda: m(x, same_t, y, mode="fast")).macs < 0.9 * count_flops(lambda: m(x, same_t, y, mode="masked")).macs


def test_released_layout_loads_strictly(tmp_path):
    from difflineage.interop.dit import save_official_dit
    from difflineage.interop.dydit import load_official_dydit

    m = random_dydit()
    path = tmp_path / "DyDiT.pt"
    torch.save({k: v.clone() for k, v in m.state_dict().items()}, path)
    loaded, info = load_official_dydit(path)
    assert info["heads"] == 4 and info["width"] and info["tokens"] and info["keep_first"]  # H - 1 router rows
    x, y = inputs()
    t = torch.full((6,), 250)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), m(x, t, y))
    broken = {k: v for k, v in m.state_dict().items() if k != "blocks.1.token_selection.mlp_head.2.bias"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="blocks.1.token_selection.mlp_head.2.bias"):
        load_official_dydit(tmp_path / "broken.pt")
    dit = DiT(DiTConfig(depth=3, hidden=64, heads=4, patch=2), 4, 8, 10)
    save_official_dit(dit, tmp_path / "dit.pt")
    with pytest.raises(CheckpointError, match="no DyDiT routers"):
        load_official_dydit(tmp_path / "dit.pt")


def test_the_released_inference_codes_layout_routes_every_unit(tmp_path):
    """dydit_0.7.pth's layout: width routers Linear(D, H), so head 0 and group 0 can be off too (here every head of
    block 0 and every MLP group of block 1); loaded strictly, and the fast path still equals the masked one."""
    from difflineage.interop.dydit import load_official_dydit

    torch.manual_seed(0)
    m = DyDiT(DiTConfig(depth=3, hidden=64, heads=4, patch=2), 4, 8, 10, dynamic=DyDiTConfig(keep_first=False))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
        m.blocks[0].attn_rate.router.bias.fill_(-100.0)
        m.blocks[1].mlp_rate.router.bias.fill_(-100.0)
    assert m.state_dict()["blocks.0.attn_rate.router.weight"].shape == (4, 64)  # H rows: every head routed
    torch.save({k: v.clone() for k, v in m.state_dict().items()}, tmp_path / "released.pt")
    loaded, info = load_official_dydit(tmp_path / "released.pt")
    assert info["heads"] == 4 and info["keep_first"] is False
    x, y = inputs()
    t = torch.tensor([5, 5, 900, 900, 300, 5])
    with torch.no_grad():
        ref, usage = loaded.eval()(x, t, y, mode="masked", return_usage=True)
        fast = loaded(x, t, y, mode="fast")
        assert torch.equal(ref, m.eval()(x, t, y, mode="masked"))
    assert usage["heads"][:, 0].max() == 0 and usage["groups"][:, 1].max() == 0 and usage["heads"][:, 2].min() > 0
    assert (fast - ref).abs().max().item() < 1e-5
    with pytest.raises(CheckpointError, match="heads=8 was asked for, but the width routers have 4 outputs"):
        load_official_dydit(tmp_path / "released.pt", heads=8)


def tiny_dydit_dict(base: str, **model) -> dict:
    return {"system": "dydit", "data": {"source": "digits", "image_size": 8, "channels": 1},
            "model": {"base": base, "target": 0.3, "router_warmup": 10,
                      "diffusion": {"sample_steps": 5, "guidance": 2.0}, **model},
            "train": {"steps": 40, "batch_size": 32, "lr": 2e-2, "log_every": 1, "sample_every": 0,
                      "checkpoint_every": 0, "sample_n": 10, "ema_decay": 0.0}}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A tiny pixel DiT (10 steps), then a DyDiT fine-tuned from it toward lambda 0.3 (40 steps)."""
    root = tmp_path_factory.mktemp("dydit")
    d = tiny_dit_dict(steps=10)
    d["model"]["dit"].update(hidden=64, heads=4)
    Trainer(config_from_dict(d), root / "dit", progress=False).fit()
    Trainer(config_from_dict(tiny_dydit_dict(str(root / "dit"))), root / "dydit", progress=False).fit()
    return root / "dydit"


def test_fine_tuning_moves_the_flops_ratio_toward_its_target(tuned_run):
    log = [json.loads(x) for x in (tuned_run / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["flops_ratio"] == 1.0 and "mse_full" in log[0]  # starts as the DiT; warm-up adds its loss
    assert log[-1]["flops_target"] == pytest.approx(0.3) and "mse_full" not in log[-1]
    assert log[5]["flops_target"] == pytest.approx(1 - 0.7 * 5 / 10)  # annealed from 1 over the warm-up
    last = sum(r["flops_ratio"] for r in log[-5:]) / 5
    assert last < 0.8  # moved from 1 toward 0.3
    system = difflineage.load(tuned_run)
    assert system.config.model.dit.hidden == 64  # the architecture came from the base
    g = torch.Generator().manual_seed(0)
    images = system.sample(4, condition=2, generator=g)
    assert images.shape == (4, 1, 8, 8)
    full = system.sample(4, condition=2, generator=torch.Generator().manual_seed(0), mode="full")
    masked = system.sample(4, condition=2, generator=torch.Generator().manual_seed(0), mode="masked")
    assert torch.allclose(images, masked, atol=1e-4) and not torch.allclose(images, full, atol=1e-3)


def test_the_flops_loss_with_routers_set_by_hand(tuned_run):
    """Routers forced to known states (weights 0, biases +-100: far beyond the Gumbel noise). The ratio the loss
    reports is the share of multiply-accumulates, counted here from the sizes (16 tokens, hidden 64, 4 heads, MLP
    256, 2 blocks; the paper's sum over layers of attn * heads_on / H + mlp * groups_on / H * tokens_on / N) over
    the counter's count of the complete network; the fast path computes just that, plus the routers themselves;
    and the FLOPs loss is 2 (ratio - lambda)^2 with lambda = 0.3, the recipe's target."""
    from difflineage.data import load_dataset

    system = difflineage.load(tuned_run).eval()
    net, lam = system.dit, 0.3
    t_tok, d, h, mlp_hidden = 16, 64, 4, 256
    attn = 3 * t_tok * d * d + t_tok * t_tok * d + t_tok * t_tok * d + t_tok * d * d  # qkv, q k^T, scores v, proj
    mlp = t_tok * d * mlp_hidden + t_tok * mlp_hidden * d  # fc1, fc2
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    t = torch.full((1,), 40)
    complete = count_flops(lambda: net(x, t, y, mode="full")).macs  # one image, every unit on
    static = complete - 2 * (attn + mlp)  # what no router touches: embedders, adaLN regressions, final layer
    batch = load_dataset(system.config.data, "train").batch(range(8))

    def force(block, heads, groups, tokens):  # the routed units 1..H-1 (unit 0 is always on), and every token
        with torch.no_grad():
            for router, states in ((block.attn_rate.router, heads), (block.mlp_rate.router, groups)):
                router.weight.zero_()
                router.bias.copy_(torch.tensor([100.0 if on else -100.0 for on in states]))
            block.token_selection.mlp_head[2].weight.zero_()
            block.token_selection.mlp_head[2].bias.fill_(100.0 if tokens else -100.0)

    for block in net.blocks:
        force(block, (1, 1, 1), (1, 1, 1), True)
    with torch.no_grad():
        _, m = system.loss(batch)
    assert m["flops_ratio"].item() == pytest.approx(1.0) and m["loss_flops"].item() == pytest.approx(2 * (1 - lam) ** 2)

    force(net.blocks[0], (1, 0, 0), (1, 1, 0), True)  # 2 of 4 heads, 3 of 4 groups, all 16 tokens
    force(net.blocks[1], (0, 0, 0), (1, 1, 1), False)  # 1 of 4 heads, 4 groups, no token through the MLP
    kept = attn * 2 / 4 + mlp * 3 / 4 * 16 / 16 + attn * 1 / 4 + mlp * 4 / 4 * 0 / 16
    ratio = (static + kept) / complete
    with torch.no_grad():
        _, m = system.loss(batch)
    assert m["heads_on"].item() == pytest.approx((2 / 4 + 1 / 4) / 2) and m["tokens_on"].item() == pytest.approx(0.5)
    assert m["flops_ratio"].item() == pytest.approx(ratio, rel=1e-6)
    assert m["loss_flops"].item() == pytest.approx(2 * (ratio - lam) ** 2, rel=1e-5)
    # the fast path does this arithmetic, plus the routers': per block two Linear(64, 3) on the timestep
    # embedding and Linear(64, 4) - ReLU - Linear(4, 1) on each of the 16 tokens
    routers = 2 * (2 * d * (h - 1) + t_tok * (d * (d // 16) + d // 16))
    assert count_flops(lambda: net(x, t, y, mode="fast")).macs == static + kept + routers


def test_info_and_sample_commands_serve_dydit(tuned_run, tmp_path, capsys):
    from difflineage.cli import main

    run = tuned_run
    assert main(["info", str(run), "--json"]) == 0
    sf = json.loads(capsys.readouterr().out)["sampling_flops"]
    assert len(sf["per_step"]) == 5  # the recipe's 5 sampler steps, each counted
    assert sf["ratio"] < 0.95 and sf["mean_macs"] < sf["full_macs"]
    assert main(["sample", str(run), "--n", "10", "--mode", "masked", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


def test_dydit_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="model.base"):
        Trainer(config_from_dict(tiny_dydit_dict("")), tmp_path / "a", progress=False).fit()
    with pytest.raises(ConfigError, match="no such checkpoint"):
        Trainer(config_from_dict(tiny_dydit_dict(str(tmp_path / "missing"))), tmp_path / "b", progress=False).fit()
    with pytest.raises(ConfigError, match="target"):
        config_from_dict(tiny_dydit_dict("x", target=1.5))
    with pytest.raises(ConfigError, match="adaLN-Zero"):
        DyDiT(DiTConfig(depth=1, hidden=32, heads=2, block="adaln"), 4, 8, 10)


def test_fine_tuning_starts_from_an_official_dit_file(tmp_path):
    from difflineage.data import load_dataset
    from difflineage.interop.dit import save_official_dit
    from difflineage.systems import SYSTEMS
    from difflineage.train import build_system
    from difflineage.train.trainer import resolve_data

    torch.manual_seed(0)
    dit = DiT(DiTConfig(depth=2, hidden=64, heads=4, patch=2), in_channels=1, input_size=8, num_classes=10).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_official_dit(dit, tmp_path / "DiT-tiny.pt")
    d = tiny_dydit_dict(str(tmp_path / "DiT-tiny.pt"))
    d["model"]["dit"] = {"heads": 4}  # no tensor records the heads of a custom-size DiT
    config = config_from_dict(d)
    data = load_dataset(config.data, "train")
    config = SYSTEMS["dydit"].resolve_config(resolve_data(config, data))
    m = config.model
    assert (m.dit.depth, m.dit.hidden, m.dit.heads, m.dit.patch) == (2, 64, 4, 2)  # read from the file
    system = build_system(config)
    system.prepare(data)  # loads the file, reorders units by importance
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 40), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(system.dit.eval()(x, t, y, mode="full"), dit(x, t, y), atol=1e-5)
        assert not torch.equal(system.dit.blocks[0].mlp.fc1.weight, dit.blocks[0].mlp.fc1.weight)  # reordered
    d["train"]["steps"] = 2
    Trainer(config_from_dict(d), tmp_path / "dydit", progress=False).fit()  # and it trains from there
    assert difflineage.load(tmp_path / "dydit").config.model.dit.hidden == 64


def test_fine_tuning_from_a_released_layout_dydit_file_keeps_its_routers(tmp_path):
    from difflineage.data import load_dataset
    from difflineage.systems import SYSTEMS
    from difflineage.train import build_system
    from difflineage.train.trainer import resolve_data

    torch.manual_seed(0)
    released = DyDiT(DiTConfig(depth=2, hidden=64, heads=4, patch=2), 1, 8, 10, dynamic=DyDiTConfig(keep_first=False))
    torch.save({k: v.clone() for k, v in released.state_dict().items()}, tmp_path / "released.pt")
    config = config_from_dict(tiny_dydit_dict(str(tmp_path / "released.pt"), complete_steps=5))
    data = load_dataset(config.data, "train")
    config = SYSTEMS["dydit"].resolve_config(resolve_data(config, data))
    assert config.model.dydit.keep_first is False and config.model.dit.heads == 4  # read from the routers' rows
    system = build_system(config)
    system.prepare(data)
    assert torch.equal(system.dit.blocks[1].mlp_rate.router.weight, released.blocks[1].mlp_rate.router.weight)
    # the complete model's loss for model.complete_steps (5), apart from the target's warm-up (router_warmup 10)
    batch = data.batch(list(range(8)))
    with torch.no_grad():
        assert "mse_full" in system.train().loss(batch, step=4)[1]
        _, metrics = system.loss(batch, step=7)
    assert "mse_full" not in metrics and metrics["flops_target"].item() < 1.0


def test_an_official_file_of_a_paper_size_gets_the_papers_heads(tmp_path):
    from difflineage.interop.dit import save_official_dit
    from difflineage.systems import SYSTEMS

    with torch.device("meta"):
        dit = DiT(DiTConfig(name="DiT-S/8"), in_channels=1, input_size=32, num_classes=10)
    state = {k: torch.zeros(v.shape) for k, v in dit.state_dict().items()}
    save_official_dit(state, tmp_path / "DiT-S-8.pt")
    d = tiny_dydit_dict(str(tmp_path / "DiT-S-8.pt"))  # the recipe leaves model.dit at its defaults (4 heads)
    d["data"]["image_size"] = 32
    config = config_from_dict(d)
    from difflineage.data import load_dataset
    from difflineage.train.trainer import resolve_data

    config = SYSTEMS["dydit"].resolve_config(resolve_data(config, load_dataset(config.data, "train")))
    assert (config.model.dit.depth, config.model.dit.hidden, config.model.dit.heads) == (12, 384, 6)


def test_the_slice_cache_follows_weight_updates():
    m = random_dydit()
    x, y = inputs()
    t = torch.full((6,), 5)
    with torch.no_grad():
        m(x, t, y, mode="fast")  # fills the cache
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    out, _ = m(x, t, y, return_usage=True)
    out.pow(2).mean().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        assert (m(x, t, y, mode="fast") - m(x, t, y, mode="masked")).abs().max().item() < 1e-5
        m.load_state_dict(random_dydit(seed=3).state_dict())
        assert (m(x, t, y, mode="fast") - m(x, t, y, mode="masked")).abs().max().item() < 1e-5

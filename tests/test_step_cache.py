"""Step caching: with every block recomputed it is the plain path exactly; a schedule chosen from a calibration run
reuses the residuals it names, and composes with DyDiT's fast path and with every sampler."""

import pytest
import torch
from test_dit_system import tiny_dit_dict

import difflineage
from difflineage.models.step_cache import StepCache, choose_reuse, draw_schedule
from difflineage.systems import config_from_dict
from difflineage.train import Trainer


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dit")
    Trainer(config_from_dict(tiny_dit_dict(steps=20)), d, progress=False).fit()
    return d


@pytest.fixture(scope="module")
def dit(dit_dir):
    return difflineage.load(dit_dir)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_every_block_recomputed_equals_the_plain_path(dit, sampler):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = dit.sample(6, condition=1, generator=g(), steps=5, sampler=sampler)
    off = StepCache.off(5, len(dit.net.blocks))
    assert torch.equal(dit.sample(6, condition=1, generator=g(), steps=5, sampler=sampler, step_cache=off), plain)
    assert off.step == 4  # the cache ran the block loop of each of the 5 network calls ...
    assert not any(isinstance(v, StepCache) for v in vars(dit.net).values())  # ... and the network holds none


def test_a_schedule_reuses_what_it_names_and_costs_no_block(dit):
    cache = dit.calibrate_step_cache(0.3, steps=10, n=4)
    assert cache.calibration.shape == (10, 2) and (cache.calibration[1:] > 0).all() and not cache.reuse[0].any()
    assert cache.reuse.sum() == 6  # 30% of 20 block evaluations
    assert not (cache.reuse[1:] & cache.reuse[:-1]).any()  # never the same block on two steps in a row
    calls = []
    for blk in dit.net.blocks:
        blk.register_forward_hook(lambda m, i, o: calls.append(1))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cached = dit.sample(4, condition=2, generator=g(), steps=10, step_cache=cache)
    assert len(calls) == 20 - 6  # reused blocks are not run
    plain = dit.sample(4, condition=2, generator=g(), steps=10)
    assert 0 < (cached - plain).abs().mean() < 0.5 * plain.abs().mean()  # near the plain samples, not equal
    for blk in dit.net.blocks:
        blk._forward_hooks.clear()


def test_choose_reuse_takes_the_smallest_changes_and_refuses_impossible_shares():
    deltas = torch.tensor([[0.0, 0.0], [0.1, 0.9], [0.05, 0.8], [0.2, 0.01]], dtype=torch.float64)
    reuse = choose_reuse(deltas, 0.25)  # 2 of 8
    assert reuse.tolist() == [[False, False], [False, False], [True, False], [False, True]]
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        choose_reuse(deltas, 0.5)
    with pytest.raises(ValueError, match="reuse\\[0\\] must be all False"):
        StepCache(torch.ones(3, 2, dtype=torch.bool))
    twice = torch.tensor([[False, False], [False, True], [False, True]])  # step 2 would reuse step 0's residual
    with pytest.raises(ValueError, match="block 1 is reused on sampler steps 1 and 2"):
        StepCache(twice)


def test_a_cache_called_more_often_than_calibrated_says_so(dit):
    with pytest.raises(RuntimeError, match="made for 3 sampler steps.*calibrate it for this sampler"):
        dit.sample(2, condition=0, steps=5, step_cache=StepCache.off(3, 2))


def test_the_schedule_picture(dit, tmp_path):
    cache = dit.calibrate_step_cache(0.2, steps=6, n=2)
    assert draw_schedule(cache, tmp_path / "cache.png").stat().st_size > 1000


def test_caching_composes_with_dydits_fast_path(tmp_path):
    from test_dydit import tiny_dydit_dict

    Trainer(config_from_dict(tiny_dit_dict(steps=5)), tmp_path / "dit", progress=False).fit()
    cfg = tiny_dydit_dict(str(tmp_path / "dit"))
    cfg["train"].update(steps=3)
    Trainer(config_from_dict(cfg), tmp_path / "dy", progress=False).fit()
    dy = difflineage.load(tmp_path / "dy")
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for mode in ("fast", "masked"):
        plain = dy.sample(4, condition=3, generator=g(), steps=5, mode=mode)
        off = StepCache.off(5, len(dy.net.blocks))
        assert torch.equal(dy.sample(4, condition=3, generator=g(), steps=5, mode=mode, step_cache=off), plain)
    cache = dy.calibrate_step_cache(0.3, steps=5, n=2, mode="fast")
    out = dy.sample(4, condition=3, generator=g(), steps=5, mode="fast", step_cache=cache)
    assert out.shape == plain.shape and torch.isfinite(out).all()


@pytest.fixture
def no_compile(monkeypatch):
    """The CLI's fast path without compiling (test_compiled_blocks_sample_as_the_eager_ones covers that)."""
    from difflineage.systems.dit import DiTSystem

    monkeypatch.setattr(DiTSystem, "compile_blocks", lambda self: False)


def test_sample_fast_says_what_it_chose_and_its_error(dit_dir, tmp_path, capsys, no_compile):
    from difflineage.cli import main

    assert main(["sample", str(dit_dir), "--n", "4", "--fast", "--steps", "6", "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "fast path: dpmpp_2m 6 steps, step cache reusing 17% of block evaluations" in out  # 2 of 12
    assert "(it changes held-back samples by 0." in out  # what the reuse costs, measured after calibrating
    assert "fast path against the plain path (steps 6): mean |difference|" in out


def test_evaluate_fast_records_its_choices_and_scores_the_cached_samples(dit_dir, tmp_path, capsys, no_compile):
    import json

    from difflineage.cli import main

    out = tmp_path / "m.json"
    assert main(["evaluate", str(dit_dir), "--n", "8", "--fast", "--steps", "6", "--bpd-images", "0", "--no-progress",
                 "--batch-size", "4", "--out", str(out)]) == 0
    assert "fast path: dpmpp_2m 6 steps, step cache reusing 17% of block evaluations" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    options = metrics["sample_options"]
    assert options["sampler"] == "dpmpp_2m" and options["steps"] == 6
    assert options["step_cache"]["reuse_fraction"] == pytest.approx(2 / 12, abs=1e-4)
    assert options["step_cache"]["steps"] == 6 and len(options["step_cache"]["schedule"]) == 12
    assert metrics["sampling_seconds"] > 0 and metrics["samples"] == 8


def test_sharded_sampling_records_the_cache_and_refuses_another_schedule(dit, tmp_path):
    import json

    from difflineage.errors import DataError
    from difflineage.eval.sampling import sample_shards

    cache = dit.calibrate_step_cache(0.2, steps=5, sampler="dpmpp_2m", n=2)
    options = {"steps": 5, "sampler": "dpmpp_2m", "step_cache": cache}
    assert sample_shards(dit, tmp_path, 4, batch_size=2, options=options, progress=False) == 2
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["options"]["step_cache"] == cache.describe()
    other = StepCache(torch.zeros_like(cache.reuse))  # every block recomputed: other decisions, same options
    with pytest.raises(DataError, match="step_cache"):
        sample_shards(dit, tmp_path, 4, batch_size=2, options={**options, "step_cache": other}, progress=False)


def test_compiled_blocks_sample_as_the_eager_ones(dit_dir):
    eager, compiled = difflineage.load(dit_dir), difflineage.load(dit_dir)
    if not compiled.compile_blocks():
        pytest.skip("no C++ compiler for inductor on this machine")
    cache = eager.calibrate_step_cache(0.2, steps=4, sampler="dpmpp_2m", n=2)
    a, b = (s.sample(3, condition=torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(5), steps=4,
                     sampler="dpmpp_2m", step_cache=cache) for s in (eager, compiled))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # parameter names kept (checkpoints unchanged)
    wrappers = [blk._compiled_call_impl for blk in compiled.net.blocks]
    assert compiled.compile_blocks() and [blk._compiled_call_impl for blk in compiled.net.blocks] == wrappers


def test_calibration_measures_what_the_reuse_costs_on_held_back_samples(dit, monkeypatch):
    """cache.error is the mean |cached - plain| of samples the calibration never drew (recomputed here); a cache
    that reuses nothing costs nothing; past the tolerance a warning says what the reuse changed, and not below it."""
    import warnings

    import difflineage.systems.dit as dit_module

    monkeypatch.setattr(dit_module, "STEP_CACHE_TOLERANCE", float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below the tolerance: no warning
        cache = dit.calibrate_step_cache(0.2, steps=6, sampler="ddim", n=2, seed=5, check=3)
    held_back = lambda: torch.Generator().manual_seed(5 + 1_000_003)  # noqa: E731
    classes = torch.arange(3) % dit.num_classes  # the held-back samples spread over the classes too
    plain = dit.sample(3, condition=classes, generator=held_back(), steps=6, sampler="ddim")
    cached = dit.sample(3, condition=classes, generator=held_back(), steps=6, sampler="ddim", step_cache=cache)
    assert cache.reuse.any() and cache.error == pytest.approx((cached - plain).abs().mean().item(), rel=1e-6)
    assert cache.error > 0 and cache.describe()["held_back_error"] == pytest.approx(cache.error, abs=1e-6)
    assert dit.calibrate_step_cache(0.0, steps=6, sampler="ddim", n=2, seed=5, check=3).error == 0.0
    monkeypatch.setattr(dit_module, "STEP_CACHE_TOLERANCE", cache.error / 2)
    with pytest.warns(UserWarning, match=r"changes 3 held-back samples by .* more than .*reuse less"):
        dit.calibrate_step_cache(0.2, steps=6, sampler="ddim", n=2, seed=5, check=3)


def test_fit_reuses_less_until_the_held_back_error_is_within_the_tolerance(dit, monkeypatch):
    """fit=True halves the share reused (from the same calibration) instead of warning, and records what was asked;
    the error it reports is that of the schedule it returns."""
    import warnings

    import difflineage.systems.dit as dit_module

    monkeypatch.setattr(dit_module, "STEP_CACHE_TOLERANCE", float("inf"))
    full = dit.calibrate_step_cache(0.4, steps=10, sampler="ddim", n=4, seed=5, check=3)
    monkeypatch.setattr(dit_module, "STEP_CACHE_TOLERANCE", full.error * 0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fit does not warn: it reuses less
        fitted = dit.calibrate_step_cache(0.4, steps=10, sampler="ddim", n=4, seed=5, check=3, fit=True)
    assert fitted.reuse_fraction < full.reuse_fraction and fitted.asked == 0.4
    assert fitted.error <= full.error * 0.6 or not fitted.reuse.any()
    assert (fitted.reuse & ~full.reuse).sum() <= fitted.reuse.sum()  # a schedule of the same calibration
    assert fitted.describe()["asked"] == 0.4 and "asked" not in full.describe()
    again = dit.sample(3, condition=torch.arange(3) % dit.num_classes,
                       generator=torch.Generator().manual_seed(5 + 1_000_003), steps=10, sampler="ddim")
    cached = dit.sample(3, condition=torch.arange(3) % dit.num_classes,
                        generator=torch.Generator().manual_seed(5 + 1_000_003), steps=10, sampler="ddim",
                        step_cache=fitted)
    assert fitted.error == pytest.approx((cached - again).abs().mean().item(), rel=1e-6)


def test_calibration_spreads_over_the_classes_in_two_halves_and_says_how_well_they_agree(dit, monkeypatch):
    """By default two samples per class (at least 16), their classes running on from one half to the other; the
    agreement is the share of the schedule's choices each half makes alone."""
    from difflineage.systems.dit import calibration_samples, schedule_agreement

    assert calibration_samples(10) == 20 and calibration_samples(2) == 16 and calibration_samples(1000) == 64
    seen = []
    original = type(dit).sample

    def spy(self, n, condition=None, *args, **kwargs):
        if kwargs.get("step_cache") is not None and kwargs["step_cache"].record:
            seen.append(condition.tolist())
        return original(self, n, condition, *args, **kwargs)

    monkeypatch.setattr(type(dit), "sample", spy)
    cache = dit.calibrate_step_cache(0.3, steps=6, sampler="ddim", check=0)
    k = dit.num_classes
    assert [len(h) for h in seen] == [calibration_samples(k) // 2] * 2
    assert sorted(set(seen[0] + seen[1])) == list(range(k)) and seen[1][0] == (seen[0][-1] + 1) % k
    assert 0.0 <= cache.agreement <= 1.0 and cache.describe()["calibration_agreement"] == round(cache.agreement, 4)
    with pytest.raises(ValueError, match="at least 2"):
        dit.calibrate_step_cache(0.3, steps=6, n=1)

    a = torch.tensor([[0, 0], [1, 0], [0, 1]], dtype=torch.bool)
    assert schedule_agreement(a, [a, a]) == 1.0
    assert schedule_agreement(a, [torch.tensor([[0, 0], [1, 0], [0, 0]], dtype=torch.bool), a]) == 0.5
    assert schedule_agreement(torch.zeros(3, 2, dtype=torch.bool), [a]) == 1.0

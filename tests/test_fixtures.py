"""Compatibility fixtures: tiny checkpoints of every system / stage written by the code of commit c4dbf4e
(tests/fixtures/make_fixtures.py), with the samples and training loss that code computed from them. Today's code
must load each checkpoint and reproduce those outputs: bit for bit on the CPU model and torch version that made
them, to floating-point tolerance elsewhere (other CPU families run other kernels)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
SYSTEMS = FIXTURES / "systems"
MANIFEST = json.loads((SYSTEMS / "manifest.json").read_text())


def _reference_module():
    spec = importlib.util.spec_from_file_location("difflineage_fixtures_reference_outputs", FIXTURES / "reference_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _reference_module()
ENV = ref.environment()
# bit-identical only where the model name, torch and the kernels' instruction set all match (a manifest from before
# cpu_capability was recorded is compared with a tolerance)
SAME_PLATFORM = all(ENV[k] == MANIFEST.get(k) for k in ("cpu_model", "torch_version", "cpu_capability"))


def test_manifest_matches_the_shared_settings():
    assert MANIFEST["threads"] == ref.THREADS
    assert MANIFEST["seeds"] == {"sample": ref.SAMPLE_SEED, "loss": ref.LOSS_SEED}
    assert (MANIFEST["n_samples"], MANIFEST["loss_batch"]) == (ref.N_SAMPLES, ref.LOSS_BATCH)
    assert sorted(MANIFEST["fixtures"]) == sorted(p.name for p in SYSTEMS.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", sorted(MANIFEST["fixtures"]))
def test_fixture_reproduces_its_reference_outputs(name):
    import difflineage

    entry = MANIFEST["fixtures"][name]
    path = SYSTEMS / name
    system = difflineage.load(path)
    assert system.config.system == entry["system"], f"{name}: config.system {system.config.system} != manifest's"
    assert ref.stage_of(system.config) == entry["stage"], f"{name}: stage {ref.stage_of(system.config)} != manifest's"
    assert ref.calls(system.config) == {"sample": entry["sample_call"], "loss": entry["loss_call"]}

    expected = load_file(str(path / "reference.safetensors"))
    got = ref.compute(path)
    assert sorted(got) == sorted(expected), f"{name}: outputs {sorted(got)} vs reference {sorted(expected)}"
    if SAME_PLATFORM:
        how = (f"bit-identical (same CPU model {ENV['cpu_model']!r}, kernels {ENV['cpu_capability']} and torch "
               f"{ENV['torch_version']} as the manifest)")
    else:
        how = (f"allclose(rtol=1e-4, atol=1e-5): this machine (CPU {ENV['cpu_model']!r}, torch {ENV['torch_version']}) "
               f"differs from the fixtures' (CPU {MANIFEST['cpu_model']!r}, torch {MANIFEST['torch_version']}), and "
               "floating-point kernels differ between CPU families and torch versions")
    for key in sorted(expected):
        a, b = got[key], expected[key]
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}/{key}: {a.dtype} {tuple(a.shape)} vs reference {b.dtype} {tuple(b.shape)}"
        if SAME_PLATFORM:
            ok = torch.equal(a, b)
        else:
            ok = torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert ok, f"{name}/{key} differs from the reference made by {MANIFEST['source_commit']} (max |diff| {diff:.3g}); expected {how}"

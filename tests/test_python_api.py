"""The Python API as documented: docs/python.md's code blocks and the README's Python and own-images walkthroughs run
here in order (with fewer steps, each substitution checked), so the docs cannot rot."""

import re
import shlex
from pathlib import Path

import pytest
from test_own_data import make_shapes

import difflineage
from difflineage.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = DOCS.parent / "README.md"
QUICK = '"train.sample_n=3", "model.diffusion.sample_steps=2"'


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shortened(code: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in code, f"the docs no longer say {old!r}: update this test's substitutions"
        code = code.replace(old, new)
    return code


def test_the_python_page_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_shapes(tmp_path / "shapes")
    page = (DOCS / "python.md").read_text()
    code = "\n".join(blocks(page, "python"))
    code = shortened(code, {"steps=3000,": f"steps=2, overrides=[{QUICK}],", "steps=50,": "steps=2,",
                            "num_inference_steps=20": "num_inference_steps=2",
                            '["train.steps=500"]': f'["train.steps=2", {QUICK}]'})
    namespace: dict = {}
    exec(compile(code, "docs/python.md", "exec"), namespace)  # noqa: S102 - the docs' own code
    printed = capsys.readouterr().out
    for line in blocks(page, "text")[0].strip().splitlines():  # the fitting the page shows is what was printed
        assert line.strip() in printed
    assert "['circle', 'square', 'triangle']" in printed and "torch.Size([8, 3, 32, 32]) True True" in printed
    assert (tmp_path / "circles.png").is_file() and (tmp_path / "two-classes.png").is_file()
    assert namespace["run"].status == "finished" and namespace["small"].step == 2
    assert namespace["config"].model.unet.attention_resolutions == (8,)
    assert re.search(r"M MACs, .* M FLOPs", printed)


def test_the_readme_walkthrough_trains_on_your_own_folder(tmp_path, monkeypatch, capsys):
    """README, "Train on your own images": every command of its bash block, in order, on a generated folder."""
    monkeypatch.chdir(tmp_path)
    make_shapes(tmp_path / "shapes")
    text = README.read_text()
    section = text.split("## Train on your own images", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in blocks(section, "bash")[0].splitlines()]
    commands = [c for c in commands if c]
    extra = {"train": ["--set", "train.steps=2", "train.sample_n=3", "model.diffusion.sample_steps=2",
                       "--no-progress"],
             "sample": ["--steps", "2"], "evaluate": ["--steps", "2"], "info": []}
    assert [shlex.split(c)[1] for c in commands] == ["train", "sample", "sample", "info"]
    for command in commands:
        argv = shlex.split(command.replace(".venv/bin/", ""))
        assert main([*argv[1:], *extra[argv[1]]]) == 0, command
    said = capsys.readouterr().out
    assert "fitted ddpm-mnist: model.unet.attention_resolutions=[8]" in said
    assert (tmp_path / "circles.png").is_file()
    system = difflineage.load(tmp_path / "runs" / "ddpm-shapes")
    assert (system.config.data.channels, system.config.data.image_size) == (3, 32)


def test_the_readme_python_example_names_a_run_the_quickstart_makes():
    code = blocks(README.read_text().split("In Python", 1)[1], "python")[0]
    assert "runs/quickstart-dit" in code and "docs/python.md" in README.read_text()


def test_the_field_s_names_for_sampling_options_are_accepted(tmp_path):
    """diffusers' keyword arguments and the official DiT scripts' flags name the same options; given twice, refused."""
    from difflineage.cli.training import add_parsers  # noqa: F401 - the parsers are built from the declarations
    from difflineage.systems.options import DiffusionOptions

    o = DiffusionOptions.of(num_inference_steps=7, guidance_scale=2.5)
    assert (o.steps, o.guidance) == (7, 2.5)
    assert DiffusionOptions.of(num_sampling_steps=3, cfg_scale=1.5).steps == 3
    with pytest.raises(TypeError, match="given twice"):
        DiffusionOptions.of(steps=3, num_inference_steps=4)
    import argparse

    from difflineage.cli.common import add_sampling_options, sampling_options

    p = argparse.ArgumentParser()
    add_sampling_options(p)
    args = p.parse_args(["--cfg-scale", "4", "--num-sampling-steps", "9"])
    assert sampling_options(args) == {"guidance": 4.0, "steps": 9}

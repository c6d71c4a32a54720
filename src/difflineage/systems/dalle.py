"""DALL-E as a system, in three parts, one per config (``model.stage``):

1. ``dvae``: the discrete VAE (``models/dalle.py``), trained on the ELBO with the Gumbel-softmax temperature
   annealed down and the KL weight annealed up. ``sample`` returns reconstructions of training images.
2. ``clip``: a small CLIP (``models/clip.py``) trained contrastively on the image/caption pairs. ``sample``
   retrieves, for each caption, the most similar images of a pool of training images.
3. ``prior``: the transformer over [caption tokens, image tokens] of the frozen dVAE (``model.first_stage``),
   with a BPE tokenizer trained on the training captions (stored in the checkpoint's weights file) and the
   CLIP of ``model.clip_stage`` carried along for reranking. ``sample`` draws image tokens with a key/value
   cache (temperature, top-k, top-p, classifier-free guidance), decodes them with the dVAE and, with
   ``rerank=N``, keeps the best of N candidates per caption by CLIP score. The checkpoint samples alone.

The system is registered once, as ``dalle`` (``DalleSystem``); ``model.stage`` picks the class that builds a
config (``DalleDVAE``, ``DalleCLIP``, ``DallePrior``) through ``for_config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflineage.config import Config
from difflineage.data import AnyBatch, Batch, Dataset, ImageDataset
from difflineage.errors import ConfigError
from difflineage.images import save_captioned_panels
from difflineage.models.clip import CLIP, CLIPConfig, clip_score, retrieval_accuracy
from difflineage.models.dalle import DalleTransformer, DalleTransformerConfig, DiscreteVAE, DVAEConfig, kl_to_uniform
from difflineage.nn.bpe import CaptionTokenizer
from difflineage.systems.base import Condition, Reconstructs, System, batches, reconstruction_scores, spread_images
from difflineage.systems.frozen import CodeStage, FrozenPart
from difflineage.systems.options import DalleOptions


Stage = Literal["dvae", "clip", "prior"]


@dataclass
class DalleDVAEConfig:
    """The dVAE stage's model section. :param stage: dvae (this stage), clip or prior (see the module docstring)."""

    stage: Stage = "dvae"
    dvae: DVAEConfig = field(default_factory=DVAEConfig)


@dataclass
class DalleCLIPConfig:
    """The CLIP stage's model section. :param stage: clip (this stage), dvae or prior."""

    stage: Stage = "clip"
    clip: CLIPConfig = field(default_factory=CLIPConfig)


@dataclass
class DallePriorConfig:
    """The prior stage's model section (``dvae`` and ``clip``: the architectures of its earlier stages, read from
    ``first_stage`` and ``clip_stage`` when training starts).
    :param first_stage: the dVAE run or checkpoint.
    :param clip_stage: the CLIP run or checkpoint (optional, needed for reranking).
    :param caption_dropout: share of training captions replaced by the empty caption (for guidance).
    :param temperature, top_k, top_p, guidance, rerank: sampling defaults (top_k 0 and top_p 1: no filtering;
        guidance 1: none; rerank 1: no reranking)."""

    stage: Stage = "prior"
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    transformer: DalleTransformerConfig = field(default_factory=DalleTransformerConfig)
    first_stage: str = ""
    clip_stage: str = ""
    caption_dropout: float = 0.1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance: float = 1.0
    rerank: int = 1

    def check(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"model.caption_dropout={self.caption_dropout} must lie in [0, 1)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.rerank < 1:
            raise ConfigError("model.temperature must be > 0, top_p in (0, 1], top_k >= 0 and rerank >= 1")


# Configs written before each stage had its own hold every stage's settings: the dVAE's and the CLIP's read the
# prior's (which holds them all) and leave them out (config.build).
DalleDVAEConfig.other_stages = DalleCLIPConfig.other_stages = (DallePriorConfig,)
STAGE_CONFIGS = {"dvae": DalleDVAEConfig, "clip": DalleCLIPConfig, "prior": DallePriorConfig}


class DalleSystem(System):
    """What every DALL-E stage shares: the registered name and config, the preview images, captions from labels.
    ``for_config`` gives the stage's own class."""

    name = "dalle"
    title = "DALL-E"
    ModelConfig = DalleDVAEConfig
    SampleOptions = DalleOptions
    preview_images = 32  # training images kept (not saved) for reconstruction or retrieval

    def __init__(self, config: Config):
        super().__init__(config)
        self.register_buffer("preview", torch.zeros(0), persistent=False)

    @classmethod
    def for_config(cls, config: Config) -> type[System]:
        return {"dvae": DalleDVAE, "clip": DalleCLIP, "prior": DallePrior}[config.model.stage]

    @classmethod
    def model_config_for(cls, model: dict) -> type:
        """Each stage's own model section, by ``model.stage`` (an unknown stage is refused by the dVAE's, which
        names the choices)."""
        stage = model.get("stage", "dvae")
        return STAGE_CONFIGS.get(stage, DalleDVAEConfig) if isinstance(stage, str) else DalleDVAEConfig

    @property
    def conditioning(self) -> str:
        """The CLIP retrieves for captions, asked for by class (the caption made from the class name)."""
        return "class"

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        self.preview = spread_images(dataset, self.device, self.preview_images)


    def _captions(self, batch: Batch) -> list[str]:
        if batch.get("caption") is None:
            raise ValueError("DALL-E trains on image/caption pairs: the data must carry captions "
                             "(labelled data gets them from data.caption_template)")
        return list(batch["caption"])

    def captions_of(self, n: int, condition: Condition) -> list[str]:
        """Captions for ``n`` samples: as given (one, or n), or made from class labels (the classes in turn)."""
        if isinstance(condition, str):
            condition = [condition]
        if isinstance(condition, list):
            if len(condition) == 1:
                return condition * n
            if len(condition) != n:
                raise ValueError(f"expected 1 or {n} captions, got {len(condition)}")
            return list(condition)
        if self.captions_from_file:
            self.refuse_classes()
        labels = self.labels_for(n, condition)
        if labels is None:
            raise ValueError("give captions: this data has no classes to make captions from")
        return self.captions_for(labels)


class DalleDVAE(Reconstructs, DalleSystem):
    """Stage 1: the discrete VAE, trained on the ELBO with annealed temperature and KL weight."""

    no_prior = "a dVAE reconstructs rather than samples: train the prior stage (model.stage=prior) to draw new images"

    def __init__(self, config: Config):
        super().__init__(config)
        self.dvae, self.side = self.make_dvae(config)

    @staticmethod
    def make_dvae(config: Config) -> tuple[DiscreteVAE, int]:
        """The dVAE a config describes and the side of its token grid."""
        m, d = config.model, config.data
        dvae = DiscreteVAE(m.dvae, image_channels=d.channels or 1)
        f = dvae.downsampling_factor
        if d.image_size % f:
            raise ConfigError(f"data.image_size={d.image_size} is not divisible by the dVAE's downsampling factor {f}")
        return dvae, d.image_size // f

    @property
    def conditioning(self) -> str:
        return "none"  # the dVAE takes no condition

    def as_first_stage(self, spec: str) -> CodeStage:
        """The trained dVAE as the frozen first stage of the prior (``ProvidesFirstStage``)."""
        return CodeStage(self.dvae, spec, self.config.data.channels or 1)

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """The annealing schedules' length fixed at the run's ``train.steps`` when it starts (``dvae.anneal_steps``)."""
        m = config.model
        if m.dvae.anneal_steps is not None:
            return config
        return replace(config, model=replace(m, dvae=replace(m.dvae, anneal_steps=config.train.steps)))

    def training_progress(self, step: Optional[int]) -> float:
        """Share of the annealing done before a batch (``step`` of ``dvae.anneal_steps``; runs from before it was
        recorded anneal over ``train.steps``); None counts as 0."""
        horizon = self.config.model.dvae.anneal_steps or self.config.train.steps
        return min(1.0, (step or 0) / max(1, horizon))

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.config.model
        x = batch["image"]
        p = self.training_progress(step)
        tau, beta = m.dvae.temperature(p), m.dvae.beta(p)
        recon, logits = self.dvae(x, tau)
        pixels = x[0].numel()
        rec_nats = (recon.float() - x).pow(2).flatten(1).sum(1) / (2 * m.dvae.sigma ** 2)  # Gaussian NLL + const
        kl = kl_to_uniform(logits).flatten(1).sum(1)  # nats per image
        loss = (rec_nats + beta * kl).mean() / pixels
        with torch.no_grad():
            mse = F.mse_loss(recon.float(), x)
            # codes used in the batch, counted on the device (unique() would wait for a GPU on every step)
            used = torch.zeros(logits.shape[1], device=logits.device).index_fill_(0, logits.argmax(1).flatten(), 1.0).sum()
        return loss, {"mse": mse, "kl_nats_per_token": kl.mean().detach() / logits[0, 0].numel(), "tau": torch.tensor(tau),
                      "beta": torch.tensor(beta), "codes_used": used}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.dvae.decode(self.dvae.encode(x.to(self.device))).float().clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DalleOptions] = None, **given: Any) -> torch.Tensor:
        """Reconstructions of training images (a dVAE has no prior yet); the prior's options are accepted."""
        self.sample_options(options, **given)
        return self.preview_reconstructions(n)

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Held-out reconstruction error and token usage."""
        return self.dvae_scores(self.dvae, self.config, dataset)

    def forward_passes(self):
        return self.dvae_passes(self.dvae, self.config, self.side)

    # -- what the prior stage asks of this one's network ------------------------------------------------

    @staticmethod
    def dvae_scores(dvae: DiscreteVAE, config: Config, dataset: ImageDataset) -> dict[str, float]:
        """The dVAE's held-out reconstruction error and token usage."""
        device = next(dvae.parameters()).device
        return reconstruction_scores(dataset, device, dvae.encode, dvae.decode, codebook=config.model.dvae.codes)

    @staticmethod
    def dvae_passes(dvae: DiscreteVAE, config: Config, side: int) -> dict[str, Callable]:
        """The dVAE's one-image forward passes (``info`` counts their arithmetic)."""
        d, device = config.data, next(dvae.parameters()).device
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=device)
        tokens = torch.zeros(1, side, side, dtype=torch.long, device=device)
        return {"dVAE encoder (one image)": lambda: dvae.encode(x), "dVAE decoder (one image)": lambda: dvae.decode(tokens)}


class DalleCLIP(DalleSystem):
    """Stage 2: a small CLIP trained contrastively on the image/caption pairs; ``sample`` retrieves."""

    ModelConfig = DalleCLIPConfig
    preview_images = 500  # the retrieval pool

    def __init__(self, config: Config):
        super().__init__(config)
        self.clip = CLIP(config.model.clip, image_channels=config.data.channels or 1)

    def clip_model(self) -> CLIP:
        return self.clip

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, acc = self.clip.loss(batch["image"], self._captions(batch))
        return loss, {"batch_retrieval_acc": acc.detach(), "logit_scale": self.clip.scale().detach()}

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DalleOptions] = None, **given: Any) -> torch.Tensor:
        """Retrieval from a pool of training images: a caption asked k times gets its k best matches (the prior's
        options are accepted)."""
        self.sample_options(options, **given)
        captions = self.captions_of(n, condition)
        if len(self.preview) == 0:
            raise ValueError("a CLIP retrieves rather than samples, from the images it saw when training started; "
                             "score it with `difflineage evaluate CKPT --n 0` (retrieval accuracy), and train the "
                             "prior stage (model.stage=prior) to draw new images")
        order = (self.clip.encode_text(captions) @ self.clip.encode_image(self.preview).t()).argsort(1, descending=True)
        rank, seen = [], {}  # the k-th time a caption is asked, its k-th best match
        for c in captions:
            rank.append(seen.get(c, 0))
            seen[c] = rank[-1] + 1
        return self.preview[order[torch.arange(n), torch.tensor(rank) % order.shape[1]]]

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Retrieval accuracy on held-out pairs and the CLIP score of real pairs."""
        return clip_retrieval_scores(self.clip, dataset)

    def forward_passes(self):
        d = self.config.data
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        return {"CLIP image encoder (one image)": lambda: self.clip.encode_image(x),
                "CLIP text encoder (one caption)": lambda: self.clip.encode_text(["a caption"])}


class DallePrior(DalleSystem):
    """Stage 3: the transformer over [caption tokens, image tokens] of the frozen dVAE (``model.first_stage``, a
    ``CodeStage`` part), with the CLIP of ``model.clip_stage`` carried for reranking (a ``FrozenPart``; a
    :class:`CarriesClip`, :class:`Reranks` system). Composed of its parts, not derived from the dVAE stage."""

    ModelConfig = DallePriorConfig
    variable_size_keys = ("tokenizer_json",)  # the tokenizer's JSON bytes: their length comes with the checkpoint

    def __init__(self, config: Config):
        super().__init__(config)
        self.dvae, self.side = DalleDVAE.make_dvae(config)
        m = config.model
        if m.clip_stage:
            self.clip = CLIP(m.clip, image_channels=config.data.channels or 1)
        self.first_stage = CodeStage(self.dvae, m.first_stage, config.data.channels or 1)
        self.clip_part = FrozenPart(self.clip, m.clip_stage) if m.clip_stage else None
        self.transformer = DalleTransformer(m.transformer, m.dvae.codes, self.side)
        # the BPE tokenizer's JSON, kept in the weights file so the checkpoint is self-contained
        self.register_buffer("tokenizer_json", torch.zeros(0, dtype=torch.uint8))
        self._tokenizer: Optional[tuple[torch.Tensor, CaptionTokenizer]] = None  # (the buffer it was read from, it)

    @property
    def conditioning(self) -> str:
        return "caption"  # a class can be asked for too: its caption is made from the class name

    def clip_model(self) -> Optional[CLIP]:
        return self.clip_part.module if self.clip_part is not None else None

    def frozen_parts(self) -> list[FrozenPart]:
        return [self.first_stage] + ([self.clip_part] if self.clip_part is not None else [])

    # -- the tokenizer lives in a buffer -------------------------------------------------------------

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The BPE tokenizer the buffer holds (read again whenever the buffer is replaced: a load gives the
        buffer the file's length, so it is a new tensor)."""
        if self._tokenizer is None or self._tokenizer[0] is not self.tokenizer_json:
            if len(self.tokenizer_json) == 0:
                raise ValueError("this DALL-E prior has no tokenizer yet: it is trained on the captions when training "
                                 "starts (or comes with the checkpoint)")
            tok = CaptionTokenizer.from_json(bytes(self.tokenizer_json.cpu().tolist()).decode("utf-8"))
            self._tokenizer = (self.tokenizer_json, tok)
        return self._tokenizer[1]

    def set_tokenizer(self, tok: CaptionTokenizer) -> None:
        self.tokenizer_json = torch.tensor(list(tok.to_json().encode("utf-8")), dtype=torch.uint8, device=self.device)
        self._tokenizer = (self.tokenizer_json, tok)

    def text_tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer.encode(captions, self.config.model.transformer.text_length).to(self.device)

    # -- the earlier stages --------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        m = config.model
        if not m.first_stage:
            raise ConfigError("model.stage=prior needs model.first_stage: the dVAE run whose tokens it models "
                              "(train it first with model.stage=dvae)")
        updates = {"dvae": cls.stage_checkpoint(m.first_stage, "first_stage", "dvae").config.model.dvae}
        if m.clip_stage:
            updates["clip"] = cls.stage_checkpoint(m.clip_stage, "clip_stage", "clip").config.model.clip
        return replace(config, model=replace(m, **updates))

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """A fresh run loads the dVAE of ``model.first_stage`` and the CLIP of ``model.clip_stage`` and trains the
        BPE tokenizer on the training captions (a resumed run carries all three); then the training set is attached
        to the dVAE (its tokens encoded once)."""
        super().prepare(dataset, restored)
        if dataset.captions is None:
            raise ConfigError(f"{dataset.name} has no captions: DALL-E's prior needs image/caption pairs "
                              "(labelled data gets captions from data.caption_template)")
        if not restored:
            for part, key, stage in ((self.first_stage, "first_stage", "dvae"), (self.clip_part, "clip_stage", "clip")):
                if part is not None:
                    part.load(self.stage_checkpoint(part.spec, key, stage).part(stage + "."))
            self.set_tokenizer(self._train_tokenizer(dataset.captions))
        self.first_stage.attach(dataset, self.device)

    def _train_tokenizer(self, captions: list[str]) -> CaptionTokenizer:
        """BPE on the training captions, trained once (rank 0) and shared with every process of the run."""
        vocab = self.config.model.transformer.text_vocab
        text = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            text = [CaptionTokenizer.train(captions, vocab).to_json()]
        if dist.is_initialized():
            dist.broadcast_object_list(text, src=0)
        tok = CaptionTokenizer.from_json(text[0])
        if tok.vocab_size > vocab:
            raise ConfigError(f"the captions' BPE vocabulary needs {tok.vocab_size} entries (their characters alone "
                              f"fill most of it), more than model.transformer.text_vocab={vocab}; set "
                              f"model.transformer.text_vocab={tok.vocab_size} or more")
        return tok

    # -- training ------------------------------------------------------------------------------------

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.config.model
        captions = self._captions(batch)
        if m.caption_dropout > 0:
            drop = (torch.rand(len(captions)) < m.caption_dropout).tolist()
            captions = ["" if dr else c for c, dr in zip(captions, drop)]
        loss, text_nll, image_nll = self.transformer.loss(self.text_tokens(captions), self._tokens_of(batch),
                                                          self.tokenizer.pad_id)
        return loss, {"text_nll": text_nll.detach(), "image_nll_bits_per_token": (image_nll / math.log(2)).detach()}

    def _tokens_of(self, batch: AnyBatch) -> torch.Tensor:
        """The batch's image tokens, flattened (N, h * w): from a latent store, cached in training, encoded otherwise."""
        return self.first_stage.encode(batch, self.training).flatten(1)

    # -- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DalleOptions] = None, **given: Any) -> torch.Tensor:
        """Images for captions (``condition``: captions, class labels, or None for the classes in turn), with
        ``DalleOptions`` (each the recipe's where not given). ``rerank`` N draws N candidates per caption and keeps
        the one CLIP scores highest."""
        o = self.sample_options(options, **given)
        m = self.config.model
        captions = self.captions_of(n, condition)
        rerank = m.rerank if o.rerank is None else o.rerank
        if rerank > 1 and self.clip_model() is None:
            raise ValueError("rerank needs a CLIP: train one (model.stage=clip) and give it as model.clip_stage")
        guidance = m.guidance if o.guidance is None else o.guidance
        temperature = m.temperature if o.temperature is None else o.temperature
        top_k = m.top_k if o.top_k is None else o.top_k
        top_p = m.top_p if o.top_p is None else o.top_p
        use_cache, progress = o.use_cache, o.progress
        many = [c for c in captions for _ in range(rerank)]  # each caption's candidates side by side
        bar = tqdm(total=self.transformer.image_length, desc=f"sampling {len(many)} token grids", disable=not progress,
                   leave=False)
        tokens = self.transformer.sample(
            self.text_tokens(many), self.text_tokens([""] * len(many)) if guidance != 1 else None, guidance=guidance,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache,
            progress=lambda i: bar.update(1))
        bar.close()
        images = self.first_stage.decode(tokens.view(-1, self.side, self.side))
        if rerank == 1:
            return images
        return self.rerank(images.view(n, rerank, *images.shape[1:]), captions)

    @torch.no_grad()
    def rerank(self, candidates: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(n, R, C, H, W) candidates for n captions -> (n, C, H, W): the candidate with the highest CLIP score."""
        n, r = candidates.shape[:2]
        scores = self.clip.score(candidates.flatten(0, 1).float(), [c for c in captions for _ in range(r)]).view(n, r)
        return candidates[torch.arange(n), scores.argmax(1)]

    # -- evaluation ----------------------------------------------------------------------------------

    def pictures(self, dataset: ImageDataset, out_dir: Path, generator: Optional[torch.Generator] = None) -> dict[str, Path]:
        labels, per_class = self.grid_labels(80)
        if labels is None:
            return {}
        panels = {}
        for r in (1, 8):
            if r > 1 and self.clip_model() is None:
                continue
            title = "plain samples" if r == 1 else f"best of {r} by CLIP score"
            panels[title] = self.sample(len(labels), labels, generator=torch.Generator().manual_seed(0), rerank=r)
        captions = self.captions_for(torch.arange(self.num_classes))
        return {"captions": save_captioned_panels(panels, captions, Path(out_dir) / "captions.png", per_class)}

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """The dVAE's scores, the held-out NLL of the image tokens given the caption in bits per token and, with a
        CLIP carried along, its retrieval accuracy and the CLIP score of real pairs."""
        out = DalleDVAE.dvae_scores(self.dvae, self.config, dataset)
        nll = sum(self.transformer.image_nll(self.text_tokens(self._captions(b)), self.dvae.encode(b["image"]).flatten(1)).sum().item()
                  for b in batches(dataset, self.device))
        out["prior_nll_bits_per_image_token"] = nll / len(dataset) / math.log(2)
        if self.clip_model() is not None:
            out.update(clip_retrieval_scores(self.clip, dataset))
        return out

    def forward_passes(self):
        passes = DalleDVAE.dvae_passes(self.dvae, self.config, self.side)
        text = torch.zeros(1, self.config.model.transformer.text_length, dtype=torch.long, device=self.device)
        tokens = torch.zeros(1, self.side * self.side, dtype=torch.long, device=self.device)
        passes["transformer, whole sequence (teacher-forced)"] = lambda: self.transformer(text, tokens)
        return passes


def clip_retrieval_scores(clip: CLIP, dataset: ImageDataset) -> dict[str, float]:
    """Retrieval accuracy both ways on a dataset's image/caption pairs and the CLIP score of the real pairs (empty
    without captions)."""
    if dataset.captions is None:
        return {}
    images = dataset.batch(range(len(dataset)))["image"]
    r = retrieval_accuracy(clip, images, dataset.captions)
    return {"clip_retrieval_image_to_caption": r["image_to_caption"],
            "clip_retrieval_caption_to_image": r["caption_to_image"],
            "clip_score_real_pairs": clip_score(clip, images, dataset.captions)}

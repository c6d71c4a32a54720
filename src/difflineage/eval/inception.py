
"""InceptionV3 as the FID code of the field runs it (the TensorFlow FID graph, ported to PyTorch).

This is the network behind the standard FID weights file ``pt_inception-2015-12-05-6726825d.pth``:
torchvision's Inception-v3 layout with 1008 output classes and the FID graph's pooling quirks (average
pools that do not count padding, a max pool in the last block). Images are read in [-1, 1] and resized
to 299x299 bilinearly, by one of two conventions:

- ``tf`` (the default): the TensorFlow FID graph's own ``ResizeBilinear`` of TF1 (align_corners=False, no
  half-pixel centres: output pixel i samples input coordinate i * in / out). This is the resize behind the
  papers' FIDs (ADM's evaluator, and so DiT's and DyDiT's numbers).
- ``pytorch-fid``: PyTorch's half-pixel bilinear (``F.interpolate``, align_corners=False), which pytorch-fid and
  torchmetrics use. It differs from the graph's by several grey levels per pixel at 256 -> 299 (tens at 32 -> 299),
  and its FIDs differ accordingly.

The 2048-d pool features give FID, KID and precision/recall, and the logits the Inception Score. The weights are
never downloaded: pass the file's path (``--inception-weights FILE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflineage.weights import load_state_dict_strict, read_weights

WEIGHTS_HELP = ("InceptionV3 FID needs the standard weights file pt_inception-2015-12-05-6726825d.pth (the one "
                "pytorch-fid and torchmetrics use, 91 MB). difflineage downloads nothing: fetch it once on a machine "
                "with internet access (it is published with the pytorch-fid project's releases) and pass its path with "
                "--inception-weights FILE. For 1-channel digit data the MNIST classifier features need no file "
                "(--features mnist).")


class ConvBN(nn.Module):
    """Conv (no bias) - BatchNorm (eps 1e-3) - ReLU, named as in the weights file (``conv``, ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """The last two blocks; the FID graph pools by average in the first and by max in the second."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


RESIZES = ("tf", "pytorch-fid")


def _tf1_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of TF1's legacy bilinear resize along one axis: output i reads input coordinate
    x = i * n_in / n_out, between pixels floor(x) and floor(x) + 1 (clamped to the last), weighted by the fraction."""
    x = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = x.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = x - lo.double()
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w


def tf1_bilinear_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size[0], size[1]) as TF1's ``tf.image.resize_bilinear`` (align_corners=False,
    half_pixel_centers=False) does it: separable, one interpolation matrix per axis."""
    h, w = images.shape[-2:]
    wh = _tf1_weights(h, size[0]).to(images.device, torch.float32)
    ww = _tf1_weights(w, size[1]).to(images.device, torch.float32)
    return torch.einsum("oh,nchw,pw->ncop", wh, images.float(), ww)


def resize_299(images: torch.Tensor, convention: str) -> torch.Tensor:
    if convention == "tf":
        return tf1_bilinear_resize(images, (299, 299))
    if convention == "pytorch-fid":
        return F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
    raise ValueError(f"unknown Inception resize {convention!r}; choose one of {', '.join(RESIZES)}")


class FIDInceptionV3(nn.Module):
    """(N, C, H, W) images in [-1, 1] -> 2048-d pool features; ``logits`` gives the 1008-way logits.
    ``resize``: ``tf`` (the FID graph's) or ``pytorch-fid`` (see the module's docstring)."""

    num_features = 2048

    def __init__(self, resize: str = "tf"):
        super().__init__()
        resize_299(torch.zeros(1, 1, 2, 2), resize)  # an unknown name fails here, not after sampling
        self.resize = resize
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_spatial(images, spatial=False)[0]

    def features_and_spatial(self, images: torch.Tensor, spatial: bool = True):
        """(pool features (N, 2048), the TF graph's ``mixed_6/conv`` (N, 192, 17, 17) or None): the latter is the
        1x1 branch of Mixed_6d (TF's mixed_6) after its BatchNorm and ReLU, which ADM's sFID reads."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_299(x, self.resize)  # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        mixed_6 = None
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            if spatial and block is self.Mixed_6d:
                mixed_6 = block.branch1x1(x)  # (N, 192, 17, 17)
            x = block(x)  # ... (N, 2048, 8, 8)
        return x.mean(dim=(2, 3)), mixed_6  # (N, 2048)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits without the bias ("logits_unbiased"), as torch-fidelity computes the Inception Score."""
        return feats @ self.fc.weight.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def load_fid_inception(path: str | Path | None, resize: str = "tf") -> FIDInceptionV3:
    """Build the network and load the FID weights file, strictly (every key named on a mismatch)."""
    if path is None:
        raise FileNotFoundError(WEIGHTS_HELP)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no InceptionV3 weights at '{path}'. {WEIGHTS_HELP}")
    state = read_weights(path, "InceptionV3 weights")  # safetensors or weights_only: never runs pickled code
    model = FIDInceptionV3(resize)
    # Old files lack BatchNorm's step counters; the auxiliary classifier is not part of the FID network.
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    load_state_dict_strict(model, state, str(path))
    return model.eval()


def random_fid_inception(seed: int = 0, path: Optional[str | Path] = None) -> FIDInceptionV3:
    """The FID network with random weights (Kaiming-normal convolutions, so activations neither die nor explode
    through the 11 blocks), written to ``path`` as safetensors when given: for dry runs of the FID plumbing (tests,
    the ImageNet dress rehearsal) where the real weights file is not at hand. Its scores mean nothing."""
    generator = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3().eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                std = (2.0 / (m.weight[0].numel())) ** 0.5  # kaiming_normal_, fan_in, ReLU gain
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
    if path is not None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model

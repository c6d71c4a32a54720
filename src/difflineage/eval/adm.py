"""FID-50K and friends as ADM's evaluator computes them (guided-diffusion's ``evaluations/evaluator.py``, which
the DiT and DyDiT papers report): samples in ADM's ``.npz`` layout scored against an ADM reference batch.

- Layout: ``arr_0`` holds uint8 images, N x H x W x 3. A reference batch (``VIRTUAL_imagenet256_labeled.npz``)
  also holds the pool statistics ``mu``/``sigma`` and the spatial ones ``mu_s``/``sigma_s`` of the whole dataset;
  its 10,000 images are the reference for precision and recall.
- Features: InceptionV3 of the TensorFlow FID graph with its own resize (TF1 bilinear to 299) and input scaling
  ((x - 128) / 128); ``pool_3`` (2048-d) for FID, IS, precision and recall, and ``mixed_6/conv`` (the 1x1 branch
  of Mixed_6d, 17 x 17 x 192), its first 7 channels flattened in TF's H, W, C order (2,023-d), for sFID.
- FID and sFID: the Frechet distance of the sample statistics to the reference's (scipy's sqrtm, the evaluator's
  1e-6 diagonal offset when the product is singular).
- Inception Score: softmax of the unbiased logits, in splits of 5,000 (10 splits for 50,000 samples).
- Precision and recall: k = 3 manifolds over squared Euclidean distances, computed in fp16 when finite (as the
  evaluator does), recall against the reference batch's images.

The metrics themselves are eval.metrics' (the one implementation, whose defaults are these conventions); this module
reads and writes the files and extracts the features.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from difflineage.errors import DataError
from difflineage.eval.inception import FIDInceptionV3
from difflineage.eval.metrics import (
    check_enough,
    gaussian_frechet_distance,
    inception_score,
    precision_recall,
    statistics,
)

REFERENCE_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
SPATIAL_CHANNELS = 7


def _open_array(zf: zipfile.ZipFile, path: Path, name: str = "arr_0"):
    """The open member ``name`` of an npz and its (shape, dtype), read from the .npy header alone."""
    member = f"{name}.npy"
    if member not in zf.namelist():
        names = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "nothing"
        raise DataError(f"{path} holds no {name} (it has {names}); ADM's layout is uint8 N x H x W x 3 images in arr_0")
    fh = zf.open(member)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    if fortran:
        raise DataError(f"{path}: {name} is stored in Fortran order; save it with np.savez from a C-ordered array")
    return fh, tuple(shape), dtype


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) in ADM's RGB layout: a gray image (C = 1) is its value in all three channels."""
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def check_npz(path: Path) -> tuple[int, int, int, int]:
    """The shape of ``arr_0`` in an ADM-layout npz, from its header (nothing else is read); refuses, by name,
    anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no sample or reference batch at '{path}'")
    try:
        with zipfile.ZipFile(path) as zf:
            fh, shape, dtype = _open_array(zf, path)
            fh.close()
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz ({exc})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"{path}: arr_0 is {dtype} {tuple(shape)}; ADM's layout is uint8 N x H x W x 3")
    return shape


def batches_of(path: Path, batch: int) -> Iterator[np.ndarray]:
    """``arr_0`` in batches of ``batch`` images, read from the file as it goes (as the evaluator reads it), so a
    50,000-image batch never sits in memory whole. A damaged file (a failed checksum, a cut-off stream) is refused
    by name."""
    try:
        with zipfile.ZipFile(path) as zf:
            fh, shape, dtype = _open_array(zf, Path(path))
            with fh:
                per_image = int(np.prod(shape[1:])) * dtype.itemsize
                for s in range(0, shape[0], batch):
                    m = min(batch, shape[0] - s)
                    raw = fh.read(m * per_image)
                    if len(raw) != m * per_image:
                        raise DataError(f"{path} ends after {s + len(raw) // per_image} of its {shape[0]} images: the "
                                        "file is truncated; write it again")
                    yield np.frombuffer(bytearray(raw), dtype=dtype).reshape(m, *shape[1:])
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path} is damaged ({type(exc).__name__}: {exc}); write it again") from None


def write_npz(path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray],
              extra: Optional[dict[str, np.ndarray]] = None) -> Path:
    """Write an npz that np.load reads as ``arr_0`` (uint8, ``shape``) plus ``extra`` arrays, streaming ``arr_0``
    from ``chunks`` (stored uncompressed, as np.savez does), so it is never whole in memory. Written under a
    temporary name and renamed, so an interrupted write leaves no npz behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": tuple(shape)}
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(fh, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(shape[1:]):
                        raise DataError(f"a chunk of {chunk.shape} does not fit images of {tuple(shape[1:])}")
                    fh.write(chunk.tobytes())
                    written += len(chunk)
            if written != shape[0]:
                raise DataError(f"{written} images were written to {path}, not the {shape[0]} its header promises")
            for name, value in (extra or {}).items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(value))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class Activations:
    pool: np.ndarray  # (N, 2048) float32
    spatial: np.ndarray  # (N, 2023) float32
    logits: np.ndarray  # (N, 1008), unbiased


@torch.no_grad()
def activations(net: FIDInceptionV3, path: Path, batch: int = 64, device: str | torch.device = "cpu",
                progress: bool = True) -> Activations:
    """The evaluator's features of every image in ``path`` (ADM layout)."""
    n = check_npz(path)[0]
    pool, spatial = [], []
    for x in tqdm(batches_of(path, batch), total=(n + batch - 1) // batch, desc=f"features: {Path(path).name}",
                  disable=not progress, dynamic_ncols=True):
        images = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float()
        # the graph's own scaling of its uint8 input (pytorch-fid's convention is x / 127.5 - 1)
        unit = (images - 128.0) / 128.0 if net.resize == "tf" else images / 127.5 - 1.0
        p, s = net.features_and_spatial(unit)
        pool.append(p.float().cpu())  # float32 as the network gives them; the statistics are float64
        spatial.append(s[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(s), -1).float().cpu())
    pool_t = torch.cat(pool)
    logits = net.logits_from_features(pool_t.float().to(device)).double().cpu()
    return Activations(pool_t.numpy(), torch.cat(spatial).numpy(), logits.numpy())


def read_reference(path: Path) -> dict[str, np.ndarray]:
    """An ADM reference batch's statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``); refused by name if absent."""
    check_npz(path)
    with np.load(path) as obj:
        missing = [k for k in REFERENCE_KEYS if k not in obj.files]
        if missing:
            raise DataError(f"{path} is not an ADM reference batch: it lacks {', '.join(missing)} (a reference batch "
                            "holds the dataset's pool and spatial statistics beside its images, e.g. "
                            "VIRTUAL_imagenet256_labeled.npz)")
        stats = {k: np.asarray(obj[k], dtype=np.float64) for k in REFERENCE_KEYS}
    if stats["mu"].shape != (2048,) or stats["mu_s"].shape != (2023,):
        raise DataError(f"{path}: statistics of sizes {stats['mu'].shape} and {stats['mu_s'].shape}, not the "
                        "evaluator's 2048 (pool_3) and 2023 (mixed_6/conv, 7 channels)")
    return stats


def write_reference(path: Path, images: np.ndarray, net: FIDInceptionV3, statistics_of: Optional[np.ndarray] = None,
                    device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """A reference batch in ADM's layout from ``images`` (uint8 N x H x W x 3): the statistics of
    ``statistics_of`` (default: the same images) beside the images themselves."""
    path = Path(path)
    tmp = path.with_name(path.name + ".images.npz")
    try:
        np.savez(tmp, arr_0=images)
        if statistics_of is None:
            return reference_from_npz(path, tmp, net, device=device, progress=progress)
        stats_tmp = path.with_name(path.name + ".stats.npz")
        np.savez(stats_tmp, arr_0=statistics_of)
        try:
            return reference_from_npz(path, tmp, net, statistics_of=stats_tmp, device=device, progress=progress)
        finally:
            stats_tmp.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


def reference_from_npz(path: Path, images: Path, net: FIDInceptionV3, statistics_of: Optional[Path] = None,
                       device: str | torch.device = "cpu", progress: bool = True, batch: int = 64) -> Path:
    """A reference batch at ``path`` from the images of the npz ``images`` (ADM layout), with the statistics of
    ``statistics_of`` (default: the same images); the images are streamed, never whole in memory."""
    check_enough(check_npz(images)[0], f"the images for the reference batch ({images})")
    if statistics_of is not None:
        check_enough(check_npz(statistics_of)[0], f"the images for the reference statistics ({statistics_of})")
    source = activations(net, statistics_of or images, batch, device, progress)
    mu, sigma = statistics(source.pool)
    mu_s, sigma_s = statistics(source.spatial)
    shape = check_npz(images)
    return write_npz(path, shape, batches_of(images, batch), extra={"mu": mu, "sigma": sigma, "mu_s": mu_s,
                                                                   "sigma_s": sigma_s})


def score(samples: Path, reference: Path, net: FIDInceptionV3, device: str | torch.device = "cpu",
          progress: bool = True, batch: int = 64) -> dict:
    """FID, sFID, Inception Score and precision/recall of ``samples`` against ``reference``, the evaluator's way."""
    stats = read_reference(reference)
    ref_shape, sample_shape = check_npz(reference), check_npz(samples)
    check_enough(sample_shape[0], f"the sample batch {samples}")
    check_enough(ref_shape[0], f"the reference batch {reference}")
    if ref_shape[1:] != sample_shape[1:]:
        raise DataError(f"samples are {sample_shape[1]}x{sample_shape[2]} but the reference batch is "
                        f"{ref_shape[1]}x{ref_shape[2]}; score against the reference of the samples' resolution")
    ref = activations(net, reference, batch, device, progress)
    got = activations(net, samples, batch, device, progress)
    mu, sigma = statistics(got.pool)
    mu_s, sigma_s = statistics(got.spatial)
    precision, recall = precision_recall(ref.pool, got.pool)
    return {"evaluator": "ADM (guided-diffusion evaluations/evaluator.py) conventions",
            "feature_network": f"InceptionV3 ({net.resize} resize)", "samples": int(sample_shape[0]),
            "reference": str(reference), "reference_images": int(ref_shape[0]),
            "fid": gaussian_frechet_distance(mu, sigma, stats["mu"], stats["sigma"]),
            "sfid": gaussian_frechet_distance(mu_s, sigma_s, stats["mu_s"], stats["sigma_s"]),
            "inception_score": inception_score(got.logits)[0], "precision": precision, "recall": recall}


__all__ = ["Activations", "activations", "as_rgb", "batches_of", "check_npz", "read_reference", "reference_from_npz",
           "score", "write_npz", "write_reference"]

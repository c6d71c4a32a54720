"""Datasets and batches: ``load_dataset(cfg.data, split)`` gives an in-memory ``ImageDataset``."""

from difflineage.data.dataset import Batch, DataError, ImageDataset, fit_size
from difflineage.data.sources import DIGIT_NAMES, SPLITS, check_source, load_dataset, read_idx

__all__ = ["Batch", "DataError", "ImageDataset", "check_source", "fit_size", "load_dataset", "read_idx", "DIGIT_NAMES", "SPLITS"]

"""Datasets and batches: ``load_dataset(cfg.data, split)`` gives an in-memory ``ImageDataset``."""

from difflineage.data.dataset import (
    AnyBatch,
    Batch,
    CodesBatch,
    DataError,
    Dataset,
    ImageDataset,
    ImageFiles,
    LatentBatch,
    collate,
    fit_size,
)
from difflineage.data.loader import BatchStream, ordered_batches, stream_workers
from difflineage.data.sources import DIGIT_NAMES, SPLITS, check_source, load_dataset, read_idx

__all__ = ["AnyBatch", "Batch", "CodesBatch", "Dataset", "LatentBatch", "BatchStream", "ordered_batches", "DataError", "ImageDataset", "ImageFiles", "collate", "stream_workers", "check_source", "fit_size", "load_dataset", "read_idx", "DIGIT_NAMES", "SPLITS"]

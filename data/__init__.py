"""Datasets for retrieval: one module per dataset family, looked up by name in the registry."""
from .base import ArrayImageDataset, DataOptions, DatasetSpec, RetrievalSplits
from .registry import DATASETS, get_dataset_spec

__all__ = ["ArrayImageDataset", "DATASETS", "DataOptions", "DatasetSpec", "RetrievalSplits", "get_dataset_spec"]

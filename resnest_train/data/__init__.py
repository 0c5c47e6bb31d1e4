"""The data package. Its public names (the `Loader` contract, the index's loading, the loaders' builders)
live in `loaders.py` and are imported on first use (PEP 562): importing the package then imports none of its
modules, so `python -m resnest_train.data.index` runs that module once, not after the package had already
imported it (runpy warns about that).
"""

from __future__ import annotations

import importlib

__all__ = ["TrainLoader", "ValLoader", "DataPlan", "DatasetError", "DatasetIndex", "TrainOrder", "build_data_plan",
           "build_train_loader", "build_val_loader", "check_classes", "known_undecodable", "load_dataset_index",
           "num_train_images", "resize_size", "shard_groups"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("resnest_train.data.loaders"), name)
    raise AttributeError(f"module 'resnest_train.data' has no attribute {name!r}")

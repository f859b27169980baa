"""`dataset: {factory: "mydata:build", kwargs: {...}}`: your own `torch.utils.data.Dataset`s.

The factory returns train, val and test (a tuple or a dict with those keys), or one Dataset that wattflow
splits, stratified by label (read from its `targets` attribute when it has one, else from its samples). Each
sample is `(input tensor, integer label)`. The identity recorded for lineage is the factory and its arguments.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from wattflow.config import DataConfig
from wattflow.data import DATASETS, DataError, Splits, stratified_indices
from wattflow.plugins import ImportPathError, load_object


def _is_dataset(obj) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__")


def labels_of(dataset: Dataset) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


@DATASETS.register("factory")
def from_factory(data: DataConfig) -> Splits:
    ref = data.dataset
    where = f"data.dataset.factory {ref.factory!r}"
    try:
        made = load_object(ref.factory, ref.path, field="data.dataset.factory")(**ref.kwargs)
    except ImportPathError as err:
        raise DataError(str(err)) from None
    if isinstance(made, dict) and {"train", "val", "test"} <= set(made):
        parts = (made["train"], made["val"], made["test"])
    elif isinstance(made, tuple | list) and len(made) == 3:
        parts = tuple(made)
    elif _is_dataset(made) and not isinstance(made, tuple | list | dict):
        y = labels_of(made)
        parts = tuple(Subset(made, idx.tolist())
                      for idx in stratified_indices(y, data.val_fraction, data.test_fraction, data.seed, where))
    else:
        raise DataError(f"{where} returned a {type(made).__name__}; return a torch.utils.data.Dataset, or "
                        "(train, val, test) Datasets (a tuple or a dict with those keys)")
    for name, part in zip(("train", "val", "test"), parts, strict=True):
        if not _is_dataset(part) or len(part) == 0:
            raise DataError(f"{where}: its {name} part is a {type(part).__name__} of no samples or not a Dataset; "
                            "return torch.utils.data.Dataset objects with samples")
    sample = parts[0][0]
    if not (isinstance(sample, tuple | list) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)):
        raise DataError(f"{where}: a sample is a {type(sample).__name__}; each sample must be (input tensor, "
                        "integer label)")
    x = sample[0]
    num_classes = getattr(parts[0], "num_classes", None) or int(labels_of(parts[0]).max()) + 1
    digest = hashlib.sha256(json.dumps({"factory": ref.factory, "kwargs": ref.kwargs}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    return Splits(*parts, num_classes=int(num_classes), input_shape=tuple(x.shape),
                  input_dtype=str(x.dtype).removeprefix("torch."),
                  identity={"name": ref.factory.rpartition(":")[2], "source": ref.factory, "digest": digest})

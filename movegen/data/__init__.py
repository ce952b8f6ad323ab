"""Data: image datasets (``images.py``) and the code store with its DataModule (``codes.py``).

The data side may import Lightning (the DataModules) and the model config, never ``lit``,
``metrics``, ``checkpoint`` or ``cli``.
"""

from .codes import (
    STORE_FORMAT,
    CodeDataModule,
    CodeStore,
    StepBatches,
    ValBatches,
    code_dtype,
    epoch_order,
    extract_codes,
    split_holdout,
    view_image,
    view_list,
    write_code_store,
)
from .images import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    FolderImages,
    ImageDataModule,
    TensorImages,
    collate_skip_none,
    dataset_fingerprint,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "STORE_FORMAT",
    "CodeDataModule",
    "CodeStore",
    "DatasetInfo",
    "FolderImages",
    "ImageDataModule",
    "TensorImages",
    "StepBatches",
    "ValBatches",
    "code_dtype",
    "epoch_order",
    "collate_skip_none",
    "dataset_fingerprint",
    "extract_codes",
    "load_dataset",
    "split_holdout",
    "view_image",
    "view_list",
    "write_code_store",
]

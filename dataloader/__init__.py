"""Data side of GlaUnTI: dataset files on disk -> `GlacierTensors` (numpy), validated and cached.

    ds = Dataset()                      # data folder: --data_folder > GLAUNTI_DATA_FOLDER > constants
    for glacier in ds.iter_glaciers(ds.train_names, prefetch=True):
        ...                             # one glacier alive at a time

See docs/architecture.md for the fields of `GlacierTensors` and the day-block layout.
"""

from dataloader.cache import CACHE_DIR_ENV, CACHE_VERSION, GlacierCache, resolve_cache_dir
from dataloader.dataset import DATA_FOLDER_ENV, Dataset, resolve_data_folder
from dataloader.errors import DataError
from dataloader.reader import GlacierInfo, read_glacier
from dataloader.tensors import GlacierTensors

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_VERSION",
    "DATA_FOLDER_ENV",
    "DataError",
    "Dataset",
    "GlacierCache",
    "GlacierInfo",
    "GlacierTensors",
    "read_glacier",
    "resolve_cache_dir",
    "resolve_data_folder",
]

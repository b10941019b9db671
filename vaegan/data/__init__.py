"""Data: CelebA, image folders and the built-in faces on the CPU (PIL), in a deterministic order."""
from .datasets import BUILTIN, DataError, build_dataset
from . import cache
from .loader import StepBatchSampler, make_loader

__all__ = ["BUILTIN", "DataError", "build_dataset", "StepBatchSampler", "make_loader"]

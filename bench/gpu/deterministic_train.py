"""`python -m train` with deterministic kernels: the bitwise resume check compares two runs'
steps, which atomics-based CUDA kernels (index_add, some backward passes) would make differ."""

import os
import runpy

import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
# warn_only: an op with no deterministic kernel warns (the log names it) instead of stopping.
torch.use_deterministic_algorithms(True, warn_only=True)
runpy.run_module("train", run_name="__main__", alter_sys=True)

"""Suite-wide settings, applied before any test module imports a plugin.

Without CUDA, Triton kernels run in Triton's CPU interpreter; ``TRITON_INTERPRET=1`` is read when a
``@triton.jit`` function is defined, so it must be set before *any* test (or plugin CLI, or backend
probe) imports a kernel module, not only in the Triton test file.
"""

import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

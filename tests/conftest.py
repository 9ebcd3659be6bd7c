"""Make the repository root importable, so tests import the plugin as `library.*`; run the fused
step's Triton kernels in Triton's CPU interpreter where no CUDA device exists (the variable must
be set before any @triton.jit module is imported, i.e. here, before test collection)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if "TRITON_INTERPRET" not in os.environ and not _cuda_present():
    os.environ["TRITON_INTERPRET"] = "1"

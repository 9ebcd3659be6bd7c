"""For tests with a fused=True case: skip it where the fused kernels cannot run."""

import pytest
import torch


def fused_kernels_or_skip():
    """The fused kernels' module; skips the calling test where Triton cannot be imported or runs
    neither on CUDA nor in its CPU interpreter (there fused=True steps eagerly, which the test would
    then check under the fused step's name)."""
    try:
        from library import automagic_sinkgd_kernels as kernels
    except ImportError as error:
        pytest.skip(f"Triton cannot be imported ({error})")
    if not torch.cuda.is_available() and not kernels.interpreting():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1")
    return kernels

"""Optimizer step time and memory: Automagic_Sinkgd against AdamW (foreach, fused) and Prodigy.

Parameter sets with the shapes of real Stable Diffusion training, random values:
  * lora: a rank-16 kohya LoRA of SD1.5 (2 x 192 U-Net modules incl. 1x1-conv proj_in/out,
    2 x 72 CLIP-L modules): 528 tensors, ~9.5M parameters;
  * full: a full fine-tune slice of the SD1.5 U-Net (down_blocks.0, up_blocks.2, conv_in/out,
    time embedding): ~85M parameters, 3x3 convs, attention, 1-D norms;
  * sdxl_lora: a rank-16 kohya LoRA of SDXL (every Linear of the U-Net's Transformer2DModels,
    taken from diffusers' SDXL U-Net built on the meta device, plus both text encoders);
  * sdxl_full: every weight of the SDXL U-Net (1,680 tensors, 2.57B parameters), for
    ``--launches-only --gpu-config`` only: counted on the meta device (shapes, no memory).
Automagic_Sinkgd is timed in warm-up (mask, Prodigy signal, weight decay active) and after
warm-up (frozen mask, decay, OrthoGrad on), eager and (where Triton runs) fused. Steps of all
optimizers are interleaved in one process so load on the machine hits them alike; the median
over repeats is reported. On CUDA the steps are timed with CUDA events, the kernels of one step
are counted by torch.profiler and the transient memory is the CUDA allocator's peak; on CPU
``--count-launches`` counts the kernels one step would launch (see ``count_launches``).

    python benchmarks/speed.py                    # both SD1.5 sets, prints a markdown table
    python benchmarks/speed.py --sets lora --repeats 10 --json out.json
    python benchmarks/speed.py --state-precision fp32 bf16   # adds Automagic rows per state precision
    python benchmarks/speed.py --device cuda --sets lora sdxl_lora full --json benchmarks/results/speed_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402
from library.builtin.atomic import atomic_write  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
FULL_SLICE = ("down_blocks.0.", "up_blocks.2.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.")


def lora_shapes(rank: int = 16) -> list[tuple[int, ...]]:
    """(down, up) shapes of every module kohya's networks.lora trains on SD1.5."""
    shapes = []
    unet_dims = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    for dim in unet_dims:  # 16 Transformer2DModel blocks
        for _ in range(4):  # attn1 q, k, v, out
            shapes += [(rank, dim), (dim, rank)]
        shapes += [(rank, dim), (dim, rank)]            # attn2 to_q
        shapes += [(rank, 768), (dim, rank)] * 2        # attn2 to_k, to_v (context dim)
        shapes += [(rank, dim), (dim, rank)]            # attn2 to_out
        shapes += [(rank, dim), (8 * dim, rank)]        # ff.net.0.proj (GEGLU)
        shapes += [(rank, 4 * dim), (dim, rank)]        # ff.net.2
        shapes += [(rank, dim, 1, 1), (dim, rank, 1, 1)] * 2  # proj_in, proj_out (1x1 conv)
    for _ in range(12):  # CLIP-L text encoder layers
        shapes += [(rank, 768), (768, rank)] * 4        # q, k, v, out_proj
        shapes += [(rank, 768), (3072, rank), (rank, 3072), (768, rank)]  # fc1, fc2
    return shapes


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def sdxl_lora_shapes(rank: int = 16) -> list[tuple[int, ...]]:
    """(down, up) shapes of a kohya LoRA on SDXL: every Linear (and 1x1 conv) inside the U-Net's
    Transformer2DModel blocks, as kohya's networks.lora targets them, and the q/k/v/out and MLP
    Linears of both text encoders (CLIP-L: 12 layers of 768, OpenCLIP bigG: 32 layers of 1280)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    shapes = []
    for module in unet.modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child in module.modules():
            if isinstance(child, torch.nn.Linear):
                shapes += [(rank, child.in_features), (child.out_features, rank)]
            elif isinstance(child, torch.nn.Conv2d) and child.kernel_size == (1, 1):
                shapes += [(rank, child.in_channels, 1, 1), (child.out_channels, rank, 1, 1)]
    for layers, dim in ((12, 768), (32, 1280)):
        for _ in range(layers):
            shapes += [(rank, dim), (dim, rank)] * 4                         # q, k, v, out_proj
            shapes += [(rank, dim), (4 * dim, rank), (rank, 4 * dim), (dim, rank)]  # fc1, fc2
    return shapes


def full_slice_shapes() -> list[tuple[int, ...]]:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return [tuple(p.shape) for name, p in unet.named_parameters() if name.startswith(FULL_SLICE)]


def sdxl_full_shapes() -> list[tuple[int, ...]]:
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return [tuple(p.shape) for p in unet.parameters()]


# Sets too large for this machine's memory: their launches are counted on the meta device, where
# every op runs for its shapes only (see launches_only).
META_SETS = ("sdxl_full",)


def make_params(shapes, seed: int, dtype=torch.float32, device="cpu") -> list[torch.nn.Parameter]:
    if device == "meta":
        params = [torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for shape in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        return params
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def fused_available(device: str) -> bool:
    """Whether Automagic_Sinkgd(fused=True) runs its Triton kernels on this device."""
    try:
        from library import automagic_sinkgd_kernels as kernels
    except ImportError:
        return False
    return device == "cuda" or kernels.interpreting()


def fused_available_dry() -> bool:
    """Whether the fused path's host code can run here (Triton importable)."""
    try:
        from library import automagic_sinkgd_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def optimizers_for(shapes, full: bool, device: str = "cpu", fused: bool = False,
                   state_precisions=("fp32",)):
    """name -> factory(params) -> optimizer; each optimizer gets its own parameter copy."""
    common = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, full_finetune=full)
    factories = {
        "AdamW(foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "Automagic warm-up": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, **common),
        "Automagic post-warm-up": lambda ps: Automagic_Sinkgd(ps, warmup_steps=2, orthograd=True, **common),
        # the opt-in per-tensor growth factor: one more pass over gradient and momentum in warm-up
        "Automagic warm-up (lr_growth)": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, lr_growth=1.0, **common),
    }
    for precision in state_precisions:
        if precision != "fp32":
            factories[f"Automagic warm-up ({precision} state)"] = lambda ps, sp=precision: Automagic_Sinkgd(
                ps, warmup_steps=10**6, state_precision=sp, **common)
            factories[f"Automagic post-warm-up ({precision} state)"] = lambda ps, sp=precision: Automagic_Sinkgd(
                ps, warmup_steps=2, orthograd=True, state_precision=sp, **common)
    if fused:
        factories["Automagic warm-up (fused)"] = lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, fused=True,
                                                                             **common)
        factories["Automagic post-warm-up (fused)"] = lambda ps: Automagic_Sinkgd(ps, warmup_steps=2, orthograd=True,
                                                                                  fused=True, **common)
        # the presets' growth factor inside the kernels: one more sum in a pass that already reads the
        # gradient and the momentum, no launch
        factories["Automagic warm-up (fused, lr_growth)"] = lambda ps: Automagic_Sinkgd(
            ps, warmup_steps=10**6, fused=True, lr_growth=1.0, **common)
        for precision in state_precisions:
            if precision != "fp32":  # the kernels read and write the compact state themselves
                factories[f"Automagic warm-up (fused, {precision} state)"] = lambda ps, sp=precision: Automagic_Sinkgd(
                    ps, warmup_steps=10**6, state_precision=sp, fused=True, **common)
                factories[f"Automagic post-warm-up (fused, {precision} state)"] = (
                    lambda ps, sp=precision: Automagic_Sinkgd(ps, warmup_steps=2, orthograd=True, state_precision=sp,
                                                              fused=True, **common))
    if device == "cpu":  # one tensor at a time: thousands of launches per step on a GPU
        factories["Automagic warm-up (per-tensor)"] = lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6,
                                                                                  foreach=False, **common)
    try:
        from prodigyopt import Prodigy
        factories["Prodigy"] = lambda ps: Prodigy(ps, lr=1.0, weight_decay=0.01, decouple=True,
                                                  use_bias_correction=True, safeguard_warmup=True)
    except ImportError:
        print("prodigyopt not installed: Prodigy left out", file=sys.stderr)
    return factories


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v))


def minimum_traffic_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes a step must move at least: every weight and state tensor read and written once, every
    gradient read once. Divided by the step time: the achieved bandwidth (GB/s) in the tables."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return 2 * weights + grads + 2 * state_bytes(optimizer)


def transient_peak_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Peak CPU memory allocated during one step() above what was live before it.

    Uses the profiler's memory timeline (a private torch API, present since 2.1), which follows
    each allocation from creation to release; raises RuntimeError if this torch lacks it.
    """
    from torch.profiler import ProfilerActivity, profile
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError as error:
        raise RuntimeError("this torch has no profiler memory timeline") from error
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        optimizer.step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0] if totals else 0


def cuda_transient_peak_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Peak CUDA memory allocated during one step() above what was live before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    optimizer.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# aten ops that only make views or metadata, or allocate without writing: no kernel on a GPU.
_NO_KERNEL = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze",
              "aten::transpose", "aten::t", "aten::permute", "aten::expand", "aten::as_strided",
              "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::empty_permuted", "aten::detach",
              "aten::alias",
              "aten::unbind", "aten::select", "aten::slice", "aten::view_as", "aten::resolve_conj",
              "aten::resolve_neg", "aten::lift_fresh", "aten::result_type", "aten::_unsafe_view",
              "aten::contiguous", "aten::to", "aten::_to_copy", "aten::expand_as", "aten::flatten",
              "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::narrow", "aten::unflatten", "aten::real",
              "aten::is_nonzero"}


_NO_KERNEL |= {"aten::_local_scalar_dense", "aten::item"}  # host reads of CPU scalars (AdamW's step)
_ONE_KERNEL = {"aten::sum", "aten::mean", "aten::linalg_vector_norm", "aten::cat", "aten::bmm"}
# Element-wise (TensorIterator) ops. On CPU one of them converts an operand of another dtype (a
# Python number, wrapped as a 0-d double tensor, in ``x * 0.9``) with a ``.to`` of its own before
# its kernel; on a GPU the kernel converts operands as it reads them and takes a Python number as
# an argument, so those ``.to`` copies launch nothing there.
_ELEMENTWISE = {f"aten::{name}{suffix}" for name in (
    "add", "sub", "rsub", "mul", "div", "eq", "ne", "gt", "lt", "ge", "le", "where", "clamp", "clamp_min",
    "clamp_max", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "pow", "copysign", "bitwise_and",
    "bitwise_xor", "bitwise_or") for suffix in ("", "_")}


def cpu_operand_cast(event) -> bool:
    """A ``.to`` (or its ``_to_copy`` / ``copy_``) that a CPU element-wise op makes of an operand
    before its kernel (see ``_ELEMENTWISE``): no launch on a GPU."""
    while event is not None and event.name in ("aten::copy_", "aten::_to_copy"):
        event = event.cpu_parent
    return (event is not None and event.name == "aten::to" and event.cpu_parent is not None
            and event.cpu_parent.name in _ELEMENTWISE)


def count_launches(optimizer: torch.optim.Optimizer, device: str) -> int:
    """Kernels one step() launches. On CUDA: the profiler's CUDA kernel and memset/memcpy events.
    On CPU: the aten ops that would each launch a kernel on a GPU (the leaves of the op tree that
    are not views or bare allocations, nor an element-wise op's CPU-only operand conversions; foreach
    ops count once, a GPU runs each as one or a few multi-tensor launches) plus the Triton launches
    of the fused path (its interpreter runs them outside aten)."""
    from torch.profiler import ProfilerActivity, profile
    triton_before = triton_launches()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    def multi_tensor(event) -> bool:
        """Ops that are one launch (or a few multi-tensor ones) on a GPU, where CPU kernels show
        per-tensor children or helper fills."""
        return event.name.startswith(("aten::_foreach_", "aten::_fused_")) or event.name in _ONE_KERNEL

    def inside_multi_tensor(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if multi_tensor(parent):
                return True
            parent = parent.cpu_parent
        return False

    def launches_kernel(event) -> bool:
        return (event.name.startswith("aten::") and event.name not in _NO_KERNEL and not inside_multi_tensor(event)
                and not cpu_operand_cast(event))

    leaves = [e for e in prof.events() if launches_kernel(e)
              and (multi_tensor(e) or not any(launches_kernel(c) for c in e.cpu_children))]
    return len(leaves) + triton_launches() - triton_before


# A conversion or device copy (.to) reaches a dispatch mode as one _to_copy, whose copy_ it does not
# see (the profiler's leaves count that copy_ instead): one kernel.
_NO_KERNEL_DISPATCHED = _NO_KERNEL - {"aten::_to_copy"}


def count_dispatched(optimizer: torch.optim.Optimizer, uploads: Optional[list] = None) -> int:
    """Kernels one step() launches, counted as the aten ops it dispatches (a dispatch mode sees each
    op as the step calls it, after composite ops decomposed, before any backend kernel) that are not
    views or bare allocations, plus the fused path's Triton launches. Unlike the profiler's leaves
    (``count_launches``), this count is the same on the meta device as on CPU, where the meta
    kernels run Python decompositions of their own: it counts the sets too large for memory.
    On the CPU sets it comes out 10-20 % below ``count_launches`` (ops whose CPU kernels call other
    ops), so compare it only with itself. Host-to-device copies (uploads, appended to ``uploads``)
    are counted where they happen: on the meta device, as on a GPU; on CPU they are no copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dispatched(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if f"aten::{func.overloadpacket.__name__}" not in _NO_KERNEL_DISPATCHED:
                Dispatched.count += 1
            out = func(*args, **(kwargs or {}))
            if uploads is not None and func.overloadpacket is torch.ops.aten._to_copy and args[0].device != out.device:
                uploads.append(func)
            return out

    triton_before = triton_launches()
    with Dispatched():
        optimizer.step()
    return Dispatched.count + triton_launches() - triton_before


def count_step(optimizer: torch.optim.Optimizer, device: str) -> int:
    """One step's launches, counted on CPU: the profiler's leaves (``count_launches``), or on the
    meta device, whose own decompositions the profiler would show, the dispatched ops."""
    return count_dispatched(optimizer) if device == "meta" else count_launches(optimizer, "cpu")


@contextlib.contextmanager
def dry_fused_kernels():
    """The fused path's host code on CPU with its Triton kernels replaced by counted no-ops: the
    stacks, copies and launches of a step are real, the values are not (phases depend on the step
    counters only, so one step's launches are those of a real run)."""
    from library import automagic_sinkgd_kernels as kernels

    class DryLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    launched = [name for name in vars(kernels) if name.endswith("_kernel")]
    saved = {name: getattr(kernels, name) for name in launched + ["interpreting", "unsupported_reason"]}
    for name in launched:
        setattr(kernels, name, DryLaunch())
    kernels.interpreting = lambda: True
    supported = saved["unsupported_reason"]
    # meta tensors (the sets too large for memory) pass as CPU ones would under the interpreter
    kernels.unsupported_reason = lambda params, states: (
        None if params and params[0].device.type == "meta" else supported(params, states))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)


def fused_launch_counts(shapes, full: bool, bf16_weights: bool = False, device: str = "cpu") -> dict[str, int]:
    """Launches of one fused step per phase, on CPU (or the meta device), with dry kernels (see
    dry_fused_kernels); ``bf16_weights`` adds the bf16-state rows with bf16 weights."""
    counts = {}
    with dry_fused_kernels():
        factories = optimizers_for(shapes, full, "cpu", fused=True, state_precisions=("fp32", "bf16"))
        labels = [(label, torch.float32) for label in (
            "Automagic warm-up (fused)", "Automagic post-warm-up (fused)", "Automagic warm-up (fused, lr_growth)",
            "Automagic warm-up (fused, bf16 state)", "Automagic post-warm-up (fused, bf16 state)")]
        if bf16_weights:
            labels += [(label, torch.bfloat16) for label in (
                "Automagic warm-up (fused, bf16 state)", "Automagic post-warm-up (fused, bf16 state)")]
        for label, dtype in labels:
            optimizer = factories[label](make_params(shapes, seed=0, dtype=dtype, device=device))
            for _ in range(4):
                optimizer.step()
            name = label.replace("bf16 state", "bf16 weights, bf16 state") if dtype == torch.bfloat16 else label
            counts[name] = count_step(optimizer, device)
    return counts


def triton_launches() -> int:
    """Triton launches made so far by the fused path (the kernels module counts them)."""
    kernels = sys.modules.get("library.automagic_sinkgd_kernels")
    return sum(kernels.launches.values()) if kernels is not None else 0


class _Timer:
    """Wall-clock on CPU; CUDA events on a GPU (no synchronisation inside the timed region)."""

    def __init__(self, device: str):
        self.device = device
        self.pending: list = []

    def time(self, fn) -> Optional[float]:
        if self.device != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        self.pending.append((start, end))
        return None

    def collect(self) -> list[float]:
        torch.cuda.synchronize()
        seconds = [start.elapsed_time(end) / 1e3 for start, end in self.pending]
        self.pending.clear()
        return seconds


def _measured_row(name: str, label: str, optimizer: torch.optim.Optimizer, median: float, numel: int, device: str,
                  launches: bool) -> dict:
    """One table row: the step's median time, state bytes per parameter, transient memory of a step
    (one more step, measured), and on CUDA (or with ``launches``) its launches and achieved GB/s."""
    transient = cuda_transient_peak_bytes(optimizer) if device == "cuda" else transient_peak_bytes(optimizer)
    row = dict(set=name, optimizer=label, ms=median * 1e3, state_bytes_per_param=state_bytes(optimizer) / numel,
               transient_mb=transient / 2**20)
    if launches or device == "cuda":
        row["launches"] = count_launches(optimizer, device)
    if device == "cuda":
        row["gb_per_s"] = minimum_traffic_bytes(optimizer) / median / 1e9
    return row


def run_set(name: str, shapes, full: bool, repeats: int, device: str = "cpu", fused: bool = False,
            launches: bool = False, warmup_steps_to_skip: int = 4, state_precisions=("fp32",)):
    factories = optimizers_for(shapes, full, device, fused, state_precisions)
    numel = sum(torch.Size(s).numel() for s in shapes)
    optimizers = {label: make(make_params(shapes, seed=0, device=device)) for label, make in factories.items()}
    for optimizer in optimizers.values():  # past Automagic's init step and into its phase (and compiled)
        for _ in range(warmup_steps_to_skip):
            optimizer.step()
    timer = _Timer(device)
    times = {label: [] for label in optimizers}
    for _ in range(repeats):
        for label, optimizer in optimizers.items():
            times[label].append(timer.time(optimizer.step))
    if device == "cuda":
        seconds = iter(timer.collect())
        times = {label: [next(seconds) for _ in values] for label, values in times.items()}
    rows = []
    base = statistics.median(times["AdamW(foreach)"])
    fused_adamw = statistics.median(times["AdamW(fused)"])
    for label, optimizer in optimizers.items():
        median = statistics.median(times[label])
        rows.append(dict(_measured_row(name, label, optimizer, median, numel, device, launches),
                         vs_foreach=median / base, vs_fused=median / fused_adamw))
    largest = max(torch.Size(s).numel() for s in shapes)
    return rows, dict(set=name, tensors=len(shapes), params=numel, largest_tensor_mb=largest * 4 / 2**20,
                      distinct_shapes=len(set(shapes)))


def large_set_optimizers(fused: bool) -> dict:
    """The rows of a set too large for one parameter copy per optimizer (SDXL full on a GPU): the
    setting an SDXL full fine-tune uses (bf16 weights, the ``full`` preset's bf16 state) against
    AdamW(fused), the fastest baseline."""
    common = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, full_finetune=True, state_precision="bf16")
    factories = {
        "AdamW(fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "Automagic warm-up (bf16 state)": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6, **common),
        "Automagic post-warm-up (bf16 state)": lambda ps: Automagic_Sinkgd(ps, warmup_steps=2, orthograd=True,
                                                                         **common),
    }
    if fused:
        factories["Automagic warm-up (fused, bf16 state)"] = lambda ps: Automagic_Sinkgd(
            ps, warmup_steps=10**6, fused=True, **common)
        factories["Automagic post-warm-up (fused, bf16 state)"] = lambda ps: Automagic_Sinkgd(
            ps, warmup_steps=2, orthograd=True, fused=True, **common)
    return factories


def device_params(shapes, seed: int, dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    """Parameters and gradients drawn on the device itself (2.6B host draws would take minutes)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=generator, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


def run_large_set(name: str, shapes, repeats: int, device: str, fused: bool, steps_to_skip: int = 4):
    """``run_set`` for a set one parameter copy per optimizer would not fit: one optimizer at a
    time (its parameters, state and timing freed before the next), bf16 weights, drawn on the
    device (``large_set_optimizers``)."""
    numel = sum(torch.Size(s).numel() for s in shapes)
    rows = []
    for label, make in large_set_optimizers(fused).items():
        optimizer = make(device_params(shapes, 0, torch.bfloat16, device))
        for _ in range(steps_to_skip):
            optimizer.step()
        timer = _Timer(device)
        seconds = [timer.time(optimizer.step) for _ in range(repeats)]
        if device == "cuda":
            seconds = timer.collect()
        rows.append(_measured_row(name, label, optimizer, statistics.median(seconds), numel, device, launches=True))
        del optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    fused_adamw = rows[0]["ms"]
    for row in rows:
        row["vs_fused"] = row["ms"] / fused_adamw
        row["vs_foreach"] = None  # AdamW(foreach) is not timed on this set
    largest = max(torch.Size(s).numel() for s in shapes)
    return rows, dict(set=name, tensors=len(shapes), params=numel, largest_tensor_mb=largest * 2 / 2**20,
                      distinct_shapes=len(set(shapes)), weights="bf16", one_optimizer_at_a_time=True)


SETS = dict(lora=lora_shapes, full=full_slice_shapes, sdxl_lora=sdxl_lora_shapes, sdxl_full=sdxl_full_shapes)
FULL_SETS = ("full", "sdxl_full")


@contextlib.contextmanager
def gpu_configuration(sms: int = 132):
    """The step's CUDA choices made on CPU, for counting a GPU's launches here: the eager chunks and
    rounding-noise gathers sized for a GPU (``core._launch_bound``) and the kernels' programs for a
    GPU of ``sms`` SMs (132: H100 / H200)."""
    import library.automagic_sinkgd as core
    saved = [(core, "_launch_bound", core._launch_bound)]
    core._launch_bound = lambda device: True
    try:
        from library import automagic_sinkgd_kernels as kernels
        saved += [(kernels, "sm_count", kernels.sm_count)]
        kernels.sm_count = lambda device: sms
    except ImportError:
        pass
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _bf16_rows(shapes, full: bool) -> dict:
    """Automagic with bf16 weights and the bf16 state (the SDXL full fine-tune's setting), eager."""
    common = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, full_finetune=full, state_precision="bf16")
    return {"Automagic warm-up (bf16 weights, bf16 state)": lambda ps: Automagic_Sinkgd(ps, warmup_steps=10**6,
                                                                                       **common),
            "Automagic post-warm-up (bf16 weights, bf16 state)": lambda ps: Automagic_Sinkgd(
                ps, warmup_steps=2, orthograd=True, **common)}


def launches_only(sets, json_path: Optional[str], machine: str, gpu_config: bool = False) -> int:
    """Kernel launches of one step of each optimizer, counted on CPU (see count_launches); with
    ``gpu_config`` the Automagic rows as the step would launch on a GPU (see gpu_configuration)."""
    rows, infos = [], []
    for name in sets:
        if name in META_SETS and not gpu_config:
            raise SystemExit(f"--sets {name}: counted on the meta device, with --launches-only --gpu-config only")
        device = "meta" if name in META_SETS else "cpu"
        shapes = SETS[name]()
        numel = sum(torch.Size(s).numel() for s in shapes)
        infos.append(dict(set=name, tensors=len(shapes), distinct_shapes=len(set(shapes)), params=numel,
                          device=device))
        factories = optimizers_for(shapes, name in FULL_SETS)
        if gpu_config:
            factories = {label: make for label, make in factories.items()
                         if label.startswith("Automagic") and "per-tensor" not in label}
        counted = dict(counted="dispatched ops") if device == "meta" else {}
        for label, make in factories.items():
            optimizer = make(make_params(shapes, seed=0, device=device))
            for _ in range(4):
                optimizer.step()
            rows.append(dict(set=name, optimizer=label, launches=count_step(optimizer, device), **counted))
        if gpu_config:
            for label, make in _bf16_rows(shapes, name in FULL_SETS).items():
                optimizer = make(make_params(shapes, seed=0, dtype=torch.bfloat16, device=device))
                for _ in range(4):
                    optimizer.step()
                rows.append(dict(set=name, optimizer=label, launches=count_step(optimizer, device), **counted))
        if fused_available_dry():
            rows += [dict(set=name, optimizer=label, launches=count, kernels_dry=True, **counted)
                     for label, count in fused_launch_counts(shapes, name in FULL_SETS, bf16_weights=gpu_config,
                                                             device=device).items()]
    print("| set | tensors | optimizer | launches per step |\n|---|---:|---|---:|")
    tensors = {info["set"]: info["tensors"] for info in infos}
    for r in rows:
        print(f"| {r['set']} | {tensors[r['set']]} | {r['optimizer']} | {r['launches']} |")
    if json_path:
        report = json.dumps(dict(machine=machine, sets=infos, rows=rows), indent=1)
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(report))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["lora", "full"], choices=list(SETS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--count-launches", action="store_true",
                        help="also count the kernels of one step (always done on CUDA)")
    parser.add_argument("--launches-only", action="store_true",
                        help="on CPU: only count one step's kernel launches per optimizer, the fused path "
                             "with its kernels dry (see dry_fused_kernels); no timing")
    parser.add_argument("--gpu-config", action="store_true",
                        help="with --launches-only: count the Automagic rows as the step launches on a GPU "
                             "(its chunking, noise gathers and kernel geometry; see gpu_configuration)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--state-precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="Automagic_Sinkgd state precisions to time (fp32 rows are always there)")
    parser.add_argument("--compile", choices=["static", "dynamic"], default=None,
                        help="time Automagic_Sinkgd with its bucket math under torch.compile "
                             "(compile time, minutes on CPU, is left out of the step times)")
    args = parser.parse_args(argv)
    if not args.launches_only and args.device != "cuda" and set(args.sets) & set(META_SETS):
        parser.error(f"--sets {' '.join(sorted(set(args.sets) & set(META_SETS)))}: on CPU launch counts only "
                     "(--launches-only --gpu-config), its weights do not fit in memory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        from torch import _dynamo  # a plain "import torch._dynamo" would make torch local to main()
        import library.automagic_sinkgd as core
        # every bucket shape and phase is its own graph with static shapes
        _dynamo.config.cache_size_limit = 256
        _dynamo.config.accumulated_cache_size_limit = 4096
        core._bucket_math = torch.compile(core._bucket_math, dynamic=args.compile == "dynamic")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    fused = fused_available(args.device)
    if fused:
        import triton
        machine += f", triton {triton.__version__}" + (" (interpreter)" if args.device == "cpu" else "")
    if args.compile:
        machine += f", Automagic bucket math under torch.compile(dynamic={args.compile == 'dynamic'})"
    print(f"machine: {machine}")
    if args.launches_only:
        if args.gpu_config:
            with gpu_configuration():
                return launches_only(args.sets, args.json, machine + ", GPU configuration (132 SMs)",
                                     gpu_config=True)
        return launches_only(args.sets, args.json, machine)
    all_rows, infos = [], []
    for name in args.sets:
        shapes = SETS[name]()
        if name in META_SETS:  # one optimizer at a time (on a GPU: ~30 GB each)
            rows, info = run_large_set(name, shapes, repeats=args.repeats, device=args.device, fused=fused)
        else:
            rows, info = run_set(name, shapes, full=name == "full", repeats=args.repeats, device=args.device,
                                 fused=fused, launches=args.count_launches,
                                 state_precisions=args.state_precision)
        if args.count_launches and args.device == "cpu" and not fused and fused_available_dry():
            info["fused_launches_dry"] = fused_launch_counts(shapes, full=name == "full")
        all_rows += rows
        infos.append(info)
        print(f"\n{name}: {info['tensors']} tensors ({info['distinct_shapes']} shapes), "
              f"{info['params'] / 1e6:.1f}M params, largest tensor {info['largest_tensor_mb']:.1f} MB (fp32)")
        for label, count in info.get("fused_launches_dry", {}).items():
            print(f"{label}: {count} launches per step (host code run, kernels dry)")
        counted = "launches" in rows[0]
        bandwidth = "gb_per_s" in rows[0]
        print("| optimizer | step ms | x AdamW(foreach) | x AdamW(fused) | state bytes/param | transient MB |"
              + (" launches/step |" if counted else "") + (" GB/s |" if bandwidth else ""))
        print("|---|---:|---:|---:|---:|---:|" + ("---:|" if counted else "") + ("---:|" if bandwidth else ""))
        for r in rows:
            vs_foreach = "-" if r["vs_foreach"] is None else f"{r['vs_foreach']:.2f}"
            print(f"| {r['optimizer']} | {r['ms']:.2f} | {vs_foreach} | {r['vs_fused']:.2f} | "
                  f"{r['state_bytes_per_param']:.1f} | {r['transient_mb']:.1f} |"
                  + (f" {r['launches']} |" if counted else "") + (f" {r['gb_per_s']:.0f} |" if bandwidth else ""))
    if args.json:
        report = json.dumps(dict(machine=machine, sets=infos, rows=all_rows), indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

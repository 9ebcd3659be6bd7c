"""Host-sync guards for the optimizer's step: shared by every "no host sync" test.

A host sync is any operation after which the host must wait for the device: reading a value
(``.item()``, ``float(t)``, ``if t:``), an output whose *size* depends on the values (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``), and a copy from the device to host memory
(``.cpu()``, ``.tolist()``, ``.numpy()``). ``no_host_sync()`` fails on each of them, by what the
operation is, not by its Python name:

* ``HostSyncGuard`` sees every ATen operation below autograd (a ``TorchDispatchMode``) and flags
  operations tagged ``data_dependent_output`` (``_local_scalar_dense``, which ``item``, ``float``
  and ``int`` reach; ``equal``, ``allclose``) and ``is_nonzero`` (``bool``); operations tagged
  ``dynamic_output_shape`` (``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave``,
  ``bincount``...) except integer indexing, which is a gather of known size; ``index`` and
  ``index_put`` with a bool or uint8 index (a mask); and any operation that writes a CPU tensor
  while reading a tensor on another device (a device-to-host copy).
* On a CPU-only machine every tensor is already on the host, so a ``.cpu()`` is not a copy at all
  and never reaches the dispatcher. The step is therefore also run with its tensors on the
  ``meta`` device (``on_device``): there the same ``.cpu()``, ``.to("cpu")`` or ``.tolist()`` is
  a copy from a non-CPU device to the host, which the guard flags exactly as it would on a GPU.
  The fused kernels cannot run on meta; for them ``HostOnlyMethods`` fails on a call of the
  methods that exist only to bring data to the host (``cpu``, ``tolist``, ``numpy``).
* Triton's CPU interpreter stands in for the GPU in the fused step's tests: the kernel body it
  runs (its own copies into numpy included) is device code, so the guard is paused while a kernel
  grid runs; the host code that prepares the launch is guarded.
* On CUDA, ``no_host_sync()`` also turns on ``torch.cuda.set_sync_debug_mode("error")``, which
  fails on every synchronising CUDA call (blocking copies in both directions included);
  ``cuda_sync_errors()`` is that part alone, for scripts that step on a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_aten = torch.ops.aten
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
             _aten._index_put_impl_.default, _aten._unsafe_index.Tensor, _aten._unsafe_index_put.default}
_MASK_DTYPES = (torch.bool, torch.uint8)


def _tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def sync_reason(func, args, kwargs, out) -> str | None:
    """Why ``func`` (an ATen overload, called with ``args``/``kwargs`` and returning ``out``)
    makes the host wait for the device; None when it does not."""
    tags = func.tags
    if torch.Tag.data_dependent_output in tags or func.overloadpacket is _aten.is_nonzero:
        return "reads a tensor value on the host"
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in _MASK_DTYPES for i in _tensors(indices)):
            return "indexes with a boolean mask (its output size depends on the values)"
    elif torch.Tag.dynamic_output_shape in tags:
        return "has an output size that depends on the values"
    inputs = [t for t in _tensors((args, kwargs)) if t.device.type != "cpu"]
    if not inputs:
        return None
    # A copy to the host, named by its target before it runs (on meta it would raise instead),
    # or seen in the output of any other operation.
    target = kwargs.get("device")
    if func.overloadpacket is _aten._to_copy and target is not None and torch.device(target).type == "cpu":
        out = torch.empty(0)
    elif func.overloadpacket is _aten.copy_ and args[0].device.type == "cpu":
        out = args[0]
    if any(t.device.type == "cpu" for t in _tensors(out)):
        return f"copies from {inputs[0].device} to the host"
    return None


class HostSyncGuard(TorchDispatchMode):
    """Raises AssertionError at the first operation that synchronises the host with the device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Judge before running where the arguments alone decide (a sync on meta would raise its own
        # error first, hiding ours), after running for device-to-host copies.
        reason = sync_reason(func, args, kwargs, ())
        if reason is None:
            out = func(*args, **kwargs)
            reason = sync_reason(func, args, kwargs, out)
            if reason is None:
                return out
        raise AssertionError(f"host sync in the optimizer step: aten.{func.__name__} {reason}")


class HostOnlyMethods(TorchFunctionMode):
    """Raises AssertionError at a call of a method whose only purpose is to bring a tensor's data to
    the host (``cpu``, ``tolist``, ``numpy``, ``__array__``): a device-to-host copy on a GPU. On
    a CPU tensor it is no copy, so the dispatcher never sees it; this catches it in the steps the
    ``meta`` device cannot run (the fused kernels under Triton's interpreter)."""

    HOST_ONLY = frozenset({torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_ONLY:
            raise AssertionError(f"host sync in the optimizer step: Tensor.{func.__name__} copies to the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _kernels_run_as_device_code() -> Iterator[None]:
    """Pause the guard inside Triton's CPU interpreter while it runs a kernel grid (device code)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    executor = interpreter.GridExecutor
    original = executor.__call__

    def run_grid(self, *args, **kwargs):
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            return original(self, *args, **kwargs)

    executor.__call__ = run_grid
    try:
        yield
    finally:
        executor.__call__ = original


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block, restored after: every CUDA call
    that synchronises (``.item()``, ``nonzero``, blocking copies either way) raises RuntimeError."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Fail on any host sync in the block (see the module's docstring); wrap one ``step()`` or the
    ``step_param()`` calls of one step in it."""
    with contextlib.ExitStack() as stack:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stack.enter_context(cuda_sync_errors())
        stack.enter_context(_kernels_run_as_device_code())
        stack.enter_context(HostOnlyMethods())
        stack.enter_context(HostSyncGuard())
        yield


def on_device(params: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """``params`` themselves on "cpu"; on "meta", parameters of the same shapes and dtypes there
    (no data), where a copy to the host is a device-to-host copy the guard sees."""
    if device == "cpu":
        return params
    return [torch.nn.Parameter(torch.empty_like(p, device=device)) for p in params]


def copy_grads(source: list[torch.Tensor], target: list[torch.Tensor]) -> None:
    """The gradients of ``source`` (CPU) onto ``target`` (the same list on "cpu")."""
    if source is not target:
        for p, q in zip(source, target):
            q.grad = None if p.grad is None else p.grad.to(q.device)

"""What the fused step needs to be right on a GPU, checked on CPU: launches on the tensors' device,
bit-for-bit repeatable results whatever order a launch's programs run in, a fallback to the
eager step when Triton cannot compile or launch, the GPUs it refuses, aligned accesses, and
SinkGD's mat-vecs in true float32 under TF32.

The kernels run in Triton's interpreter (tests/conftest.py); a GPU is mocked where one is named.
"""

import builtins
import contextlib
import sys
import types
import warnings

import pytest
import torch

from library import automagic_sinkgd as core
from library.automagic_sinkgd import Automagic_Sinkgd

try:
    from library import automagic_sinkgd_kernels as kernels
except ImportError as error:  # no Triton on this machine
    pytest.skip(f"Triton cannot be imported ({error})", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels.interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

torch.set_num_threads(1)

SETTINGS = dict(lr=1e-3, min_lr=1e-4, max_lr=1e-2, lr_bump=2e-4, warmup_steps=3, orthograd=True,
                weight_decay=0.1, stats_update_freq=1, d_coef=3.0)
# (160, 24) and (96, 40) take the split path below (five blocks of 32 rows, three of 32: sums over
# three or more blocks change with their order), (4, 24) and the vector the one-program kernel
SHAPES = [(160, 24), (160, 24), (96, 40), (4, 24), (4, 24), (24,)]


def _split_small_tensors(monkeypatch):
    monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 500)


def _run(steps, dtype=torch.float32, seed=3, **settings):
    """Weights and state after ``steps`` fused steps from one seed (the same gradients each run)."""
    generator = torch.Generator().manual_seed(seed)
    # weights of the update's size: a last-bit change of the update shows in the weights
    params = [torch.nn.Parameter((torch.randn(s, generator=generator) * 1e-3).to(DEVICE, dtype)) for s in SHAPES]
    optimizer = Automagic_Sinkgd(params, **{**SETTINGS, "fused": True, **settings})
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(DEVICE, dtype)  # VRAdam unclipped
        optimizer.step()
    state = [{k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params]
    return [p.detach().clone() for p in params], state


def _assert_bitwise_equal(first, second):
    (weights_a, state_a), (weights_b, state_b) = first, second
    for a, b in zip(weights_a, weights_b):
        assert torch.equal(a, b), f"weights of {tuple(a.shape)} differ"
    for sa, sb in zip(state_a, state_b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"state {key} of shape {tuple(sa[key].shape)} differs"


@contextlib.contextmanager
def _programs_in_reverse_order():
    """Triton's interpreter runs a launch's programs one after another, in grid order; a GPU runs
    them in any order. This runs them last to first (only the interpreter's grid loop is changed)."""
    from triton.runtime import interpreter
    grid_loop = interpreter.GridExecutor.__call__.__code__

    def program_order(*args):
        order = builtins.range(*args)
        return reversed(order) if sys._getframe(1).f_code is grid_loop else order

    interpreter.range = program_order
    try:
        yield
    finally:
        del interpreter.range


@pytest.mark.parametrize("precision, dtype, growth", [("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                                     ("fp32", torch.float32, 1.0)],
                         ids=["fp32-state-fp32-weights", "bf16-state-bf16-weights", "lr_growth"])
def test_every_fused_path_is_bitwise_repeatable(monkeypatch, precision, dtype, growth):
    """The same state and gradients through the one-program and the split kernels (t = 2: early
    warm-up, Prodigy signal, weight decay; t = 3: the first post-warm-up step, OrthoGrad) twice on a
    GPU, and once with every launch's programs run last to first: the same bits each time. Each
    row block's sums go to a slot of its own and are added in block order; with float atomics
    the reversed run differs (the sums follow the order the blocks finish in, as on a GPU). With
    the presets' lr_growth the split path's first block grows the factor the last launch reads."""
    _split_small_tensors(monkeypatch)
    before = dict(kernels.launches)
    settings = dict(state_precision=precision, lr_growth=growth)
    first = _run(3, dtype, **settings)
    launched = {k: v - before.get(k, 0) for k, v in kernels.launches.items()}
    assert launched.get("bucket_step", 0) == 2 * 2 and launched.get("split_weights", 0) == 2 * 2, launched
    if DEVICE == "cuda":  # the interpreter runs programs in one order: a plain rerun proves nothing here
        _assert_bitwise_equal(first, _run(3, dtype, **settings))
    with _programs_in_reverse_order():
        reversed_run = _run(3, dtype, **settings)
    _assert_bitwise_equal(first, reversed_run)
    if growth:
        assert all("lr_growth" in state for state in first[1])


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)],
                         ids=["fp32-state-fp32-weights", "bf16-state-bf16-weights"])
def test_the_eager_step_is_bitwise_repeatable(precision, dtype):
    """The eager step twice from the same state and gradients: the same bits (on a GPU its
    batched mat-vecs, gathers and multi-tensor kernels; benchmarks/gpu_check.sh runs this there)."""
    _assert_bitwise_equal(_run(3, dtype, fused=False, state_precision=precision),
                          _run(3, dtype, fused=False, state_precision=precision))


def test_kernels_launch_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: the kernels' launches are made with the
    tensors' device current (a mocked cuda:1 while cuda:0 is current)."""
    current = [0]

    class MockedDevice:  # torch.cuda.device's contract: current inside, the old one restored after
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "device", MockedDevice)
    with kernels.launch_guard(torch.device("cuda", 1)):
        assert current[0] == 1
    assert current[0] == 0
    with kernels.launch_guard(torch.device("cpu")):
        assert current[0] == 0

    # every launch of a step happens inside the guard of the bucket's device
    guarded, launched_in = [], []
    real_guard, real_math = kernels.launch_guard, kernels.bucket_math

    @contextlib.contextmanager
    def recording_guard(device):
        guarded.append(device)
        with real_guard(device):
            yield
        guarded.pop()

    def recording_math(*args, **kwargs):
        launched_in.append(list(guarded))
        return real_math(*args, **kwargs)

    monkeypatch.setattr(kernels, "launch_guard", recording_guard)
    monkeypatch.setattr(kernels, "bucket_math", recording_math)
    _run(2)
    assert launched_in and all(devices == [torch.device(DEVICE)] for devices in launched_in), launched_in


def test_gpus_older_than_ampere_take_the_eager_step(monkeypatch):
    capability = [(7, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    gpu_param = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32,
                                      numel=lambda: 96, ndim=2, shape=torch.Size((4, 24)))
    state = dict(exp_avg=torch.zeros(4, 24), lr_mask=torch.zeros(4, 24))
    assert "compute capability (7, 0)" in kernels.unsupported_reason([gpu_param], [state])
    capability[0] = (8, 0)
    assert kernels.unsupported_reason([gpu_param], [state]) is None


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
def test_a_kernel_that_fails_to_compile_warns_once_and_steps_eagerly(monkeypatch, split):
    """A Triton compile or launch error (an old driver, a GPU its ptxas dropped) turns the fused
    step into the eager one, with one warning: the weights are the eager run's, bit for bit."""
    if split:
        _split_small_tensors(monkeypatch)
    monkeypatch.setattr(core, "_KERNELS", [kernels])  # the fallback drops the kernels: restored after

    class Uncompilable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PTX .target sm_60 is not supported by this ptxas (simulated)")
            return launch

    monkeypatch.setattr(kernels, "_split_reductions_kernel" if split else "_bucket_step_kernel", Uncompilable())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _run(4)
    messages = [str(w.message) for w in caught if "fused kernels failed" in str(w.message)]
    assert len(messages) == 1 and "simulated" in messages[0], messages
    eager = _run(4, fused=False)
    _assert_bitwise_equal(fused, eager)


def test_misaligned_tensors_take_the_eager_step():
    """The kernels read gradients and weights with 128-bit accesses (tl.multiple_of(16)): a tensor
    whose address is not a multiple of 16 bytes (a view into a larger buffer) is left to the
    eager step."""
    p = torch.zeros(4, 24, device=DEVICE)
    grad = torch.zeros(4, 24, device=DEVICE)
    state = dict(exp_avg=torch.zeros(4, 24, device=DEVICE), lr_mask=torch.zeros(4, 24, device=DEVICE))
    group = dict(lr=1e-3)
    assert kernels.takes_bucket([p], [grad], [state], group)
    shifted = torch.zeros(4 * 24 + 1, device=DEVICE)[1:].view(4, 24)  # 4 bytes past an aligned block
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 == 4
    assert not kernels.takes_bucket([p], [shifted], [state], group)
    assert not kernels.takes_bucket([shifted], [grad], [state], group)


def test_sinkgd_matvecs_run_in_true_float32_under_tf32(monkeypatch):
    """A trainer's TF32 setting (kohya sets it for speed) would make SinkGD's cuBLAS mat-vecs
    10-bit accurate; the scalings are computed with it off, and the setting is restored."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True  # a property of torch's backend module: set and restored by hand
    try:
        _check_sinkgd_matvecs_in_float32(monkeypatch, matmul)
    finally:
        matmul.allow_tf32 = previous


def test_sinkgd_matvecs_leave_a_medium_matmul_precision_as_it_was(monkeypatch):
    """torch.set_float32_matmul_precision("medium") (TF32, and bf16 where a backend has it) is
    restored as "medium", not "high", and torch.get_float32_matmul_precision() still answers (it
    raises once the legacy flag and the per-backend settings disagree)."""
    torch.set_float32_matmul_precision("medium")
    try:
        _check_sinkgd_matvecs_in_float32(monkeypatch, torch.backends.cuda.matmul)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")  # torch's default


def _check_sinkgd_matvecs_in_float32(monkeypatch, matmul):
    seen = []
    real_bmm = torch.bmm

    def recording_bmm(*args, **kwargs):
        seen.append(matmul.allow_tf32)
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    update = torch.randn(2, 5, 7)
    rows, cols = core.sinkgd_scalings(update, iters=3)
    assert seen == [False] * 5  # 2 * iters - 1 mat-vecs
    assert matmul.allow_tf32 is True
    monkeypatch.setattr(torch, "bmm", real_bmm)
    assert torch.equal(rows, core.sinkgd_scalings(update, iters=3)[0])  # the math is unchanged


def test_a_gpu_steps_eagerly_in_large_chunks_and_draws_noise_in_one_gather(monkeypatch):
    """On a GPU (mocked: core._launch_bound) a bucket's eager chunks hold up to 16M elements, not
    the CPU's largest tensor or 64K (launches, not the allocator, are the cost there), and a lone tensor's rounding
    noise is one gather, not one copy per 65,536-element period: the same bits either way."""
    params = [torch.nn.Parameter(torch.zeros(16, 320)) for _ in range(300)]  # 1.5M elements
    optimizer = Automagic_Sinkgd(params, lr=1e-4)
    members = [(i, p, None, None, None, True) for i, p in enumerate(params)]
    assert len(list(optimizer._chunks(members, None))) == 25  # CPU: chunks of 64K elements, 12 tensors
    bits = torch.randint(-2**20, 2**20, (1, 200_000), dtype=torch.int32)
    on_cpu = core.add_rounding_noise_(bits.clone(), [12345])
    monkeypatch.setattr(core, "_launch_bound", lambda device: True)
    assert len(list(optimizer._chunks(members, None))) == 1
    calls = []
    real_index = core.noise_index
    monkeypatch.setattr(core, "noise_index", lambda *args: calls.append(1) or real_index(*args))
    assert torch.equal(core.add_rounding_noise_(bits.clone(), [12345]), on_cpu)
    assert len(calls) == 1  # one gather (the CPU loop takes one per period: 4 here)


def test_large_tensors_take_fused_chunks_as_large_as_the_split_kernels_buffer(monkeypatch):
    """A bucket of large tensors the split kernels step is chunked by their own buffers' bound
    (split_chunk_numel), not by the eager step's (each chunk costs 2 + sinkgd_iters launches and
    stacks no gradients): an SDXL full step takes 31 chunks instead of 190. Smaller or larger chunks
    give the same bits."""
    _split_small_tensors(monkeypatch)
    monkeypatch.setattr(core, "_launch_bound", lambda device: True)
    monkeypatch.setattr(core, "_GPU_CHUNK_NUMEL", 160 * 24)  # the eager step: one tensor per chunk

    def run(tensors_per_chunk):
        monkeypatch.setattr(kernels, "split_chunk_numel", lambda shape: tensors_per_chunk * 160 * 24)
        generator = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(160, 24, generator=generator) * 1e-3) for _ in range(8)]
        optimizer = Automagic_Sinkgd(params, **{**SETTINGS, "fused": True})
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 0.01
            before = kernels.launches.get("split_state", 0)
            optimizer.step()
        return [p.detach().clone() for p in params], kernels.launches.get("split_state", 0) - before

    weights_one, chunks_one = run(1)
    weights_four, chunks_four = run(4)
    assert (chunks_one, chunks_four) == (8, 2)
    assert all(torch.equal(a, b) for a, b in zip(weights_one, weights_four))


def _vector_model(dtype=torch.float32, seed=0):
    """Biases and norm weights of five lengths (one alone), and matrices, as a U-Net has them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(40,), (40,), (24,), (7,), (24,), (40,), (3,), (1,), (), (12, 24), (6, 5), (12, 24)]
    return [torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.1).to(dtype)) for shape in shapes]


def _train_vectors(monkeypatch, launch_bound: bool, steps: int, state_precision="fp32", dtype=torch.float32,
                   nan_at=None, settings=None):
    monkeypatch.setattr(core, "_launch_bound", lambda device: launch_bound)
    params = _vector_model(dtype)
    optimizer = Automagic_Sinkgd(params, **{**SETTINGS, "state_precision": state_precision, **(settings or {})})
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(dtype)
        if nan_at == step:
            params[2].grad[5] = float("nan")
            params[-1].grad[3, 1] = float("-inf")
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("state_precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_a_gpu_steps_vectors_of_every_length_as_one_padded_stack(monkeypatch, state_precision, dtype):
    """On a GPU (mocked: core._launch_bound) the vectors of every length are one zero-padded (B, L)
    stack, not a bucket per length (an SD1.5 U-Net has 8 lengths, ~50 launches each): the same
    step as on CPU, to float32 rounding (sums run over the padding's zeros; the means are dot
    products with 1 / length), through warm-up, a NaN gradient in one vector, and the post-warm-up
    phase, with the fp32 and the bf16 state. The padding never reaches a tensor or its state."""
    calls = []
    real_step_bucket = core._step_bucket
    monkeypatch.setattr(core, "_step_bucket", lambda params, *a, **k: calls.append(len(params))
                        or real_step_bucket(params, *a, **k))
    on_cpu, cpu_optimizer = _train_vectors(monkeypatch, False, 8, state_precision, dtype, nan_at=4)
    cpu_calls, calls[:] = list(calls), []
    on_gpu, gpu_optimizer = _train_vectors(monkeypatch, True, 8, state_precision, dtype, nan_at=4)
    # the last step's buckets: CPU one per shape (the 0-d tensor with the 1-element vector), GPU the
    # matrices by shape and every vector in one stack
    assert sorted(cpu_calls[-7:]) == [1, 1, 1, 2, 2, 2, 3]
    assert sorted(calls[-3:]) == [1, 2, 9]
    tolerance = dict(rtol=2e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=0, atol=0)
    for p_cpu, p_gpu in zip(on_cpu, on_gpu):
        assert p_cpu.shape == p_gpu.shape
        torch.testing.assert_close(p_gpu, p_cpu, **tolerance)
        state_cpu, state_gpu = cpu_optimizer.state[p_cpu], gpu_optimizer.state[p_gpu]
        assert state_cpu.keys() == state_gpu.keys()
        for key, value in state_cpu.items():
            if isinstance(value, torch.Tensor):
                assert value.shape == state_gpu[key].shape, key
                if value.is_floating_point():
                    torch.testing.assert_close(state_gpu[key], value, rtol=1e-5, atol=1e-9)
                else:
                    assert torch.equal(state_gpu[key], value), key



def test_a_gpu_tests_the_whole_groups_gradients_for_nan_and_inf_at_once(monkeypatch):
    """finite_flags: one flag per tensor, 0 for a NaN, +Inf or -Inf anywhere in it, whatever the
    gradients' dtypes; on a GPU (mocked) the step skips exactly the tensors a CPU step skips."""
    grads = [torch.ones(3), torch.tensor([1.0, float("nan")]), torch.ones(2, 2, dtype=torch.bfloat16),
             torch.tensor([float("inf")]), torch.tensor([-float("inf"), 0.0], dtype=torch.bfloat16),
             torch.full((4,), 3e38)]
    assert core.finite_flags(grads).tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # the last: its |g| sum overflows
    assert core.finite_flags(grads + [torch.ones(2, dtype=torch.float64)]).dtype == torch.float64
    # float16 gradients (their L1 norm would overflow at 65504) keep the per-chunk test
    monkeypatch.setattr(core, "_launch_bound", lambda device: True)
    half = [(0, torch.zeros(3), torch.full((3,), 3e4, dtype=torch.float16), None, None, False)]
    assert core.Automagic_Sinkgd._finite_flags_of([half]) == [None]
    assert core.Automagic_Sinkgd._finite_flags_of([[(0, torch.zeros(3), torch.ones(3), None, None, False)]])[0] == 1
    for launch_bound in (False, True):
        params, _ = _train_vectors(monkeypatch, launch_bound, 6, nan_at=4)
        before, _ = _train_vectors(monkeypatch, launch_bound, 4)
        after_skip, _ = _train_vectors(monkeypatch, launch_bound, 5, nan_at=4)
        for index, (p, q) in enumerate(zip(before, after_skip)):
            assert torch.equal(p, q) == (index in (2, len(params) - 1)), index  # only the two skipped


def test_padded_vector_stacks_resume_bit_for_bit(monkeypatch, tmp_path):
    """A run that saves its state (views into a padded stack) and resumes steps to the same bits as
    one that never stopped."""
    straight, _ = _train_vectors(monkeypatch, True, 9)
    params, optimizer = _train_vectors(monkeypatch, True, 5)
    torch.save(optimizer.state_dict(), tmp_path / "state.pt")
    weights = [p.detach().clone() for p in params]
    resumed = [torch.nn.Parameter(w) for w in weights]
    optimizer = Automagic_Sinkgd(resumed, **SETTINGS)
    optimizer.load_state_dict(torch.load(tmp_path / "state.pt"))
    generator = torch.Generator().manual_seed(1)
    for step in range(9):
        grads = [torch.randn(p.shape, generator=generator) * 0.01 for p in resumed]
        if step < 5:
            continue
        for p, g in zip(resumed, grads):
            p.grad = g
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_padded_vector_chunks_bound_their_padding():
    """Vectors merge longest first while the padding stays small: under 1M elements any mix, above
    it at most 4x the tensors' own elements, and never past the chunk limit."""
    def chunks(lengths, limit=1 << 24):
        members = [(i, torch.empty(n), None, None, None, False) for i, n in enumerate(lengths)]
        return [[m[1].numel() for m in chunk] for chunk in core._padded_vector_chunks(members, limit)]

    assert chunks([320, 5120, 640, 4]) == [[5120, 640, 320, 4]]
    # padded to 1M each, a fifth vector would make the chunk 5M for its 1M + 64 own elements
    assert chunks([1 << 20] + [16] * 4) == [[1 << 20, 16, 16, 16], [16]]
    assert chunks([1 << 19] * 3 + [1 << 18]) == [[1 << 19] * 3 + [1 << 18]]  # 2M padded, 1.75M own
    assert chunks([64] * 10, limit=256) == [[64] * 4, [64] * 4, [64] * 2]


def test_a_padded_stack_of_vectors_never_reaches_the_fused_kernels(monkeypatch):
    """With fused=True, a vector bucket the kernels refuse (here: a misaligned gradient view) joins
    the eager step's padded stack of every length; the kernels, which step tensors of one shape,
    must not be offered that stack again (they would read and write each shorter vector for the
    longest one's length: past its end). Memory next to the vectors stays untouched, and the
    weights and masks are the CPU step's."""
    monkeypatch.setattr(core, "_GPU_CHUNK_NUMEL", 128)  # small chunks, as the 16M limit splits large sets
    monkeypatch.setattr(core, "_PADDED_VECTORS_FREE", 0)
    offered = []
    real_fused = core._fused_step_bucket
    monkeypatch.setattr(core, "_fused_step_bucket", lambda kernels, params, *a: offered.append(
        {p.numel() for p in params}) or real_fused(kernels, params, *a))

    def run(launch_bound):
        monkeypatch.setattr(core, "_launch_bound", lambda device: launch_bound or DEVICE != "cpu")
        generator = torch.Generator().manual_seed(0)
        storage = torch.full((64,), 7.0, device=DEVICE)  # three vectors, then memory that is not a parameter
        storage[:24] = torch.randn(24, generator=generator).to(DEVICE) * 0.1
        params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(DEVICE) * 0.1) for n in (64, 32, 32)]
        params += [torch.nn.Parameter(storage[8 * i:8 * i + 8]) for i in range(3)]
        params.append(torch.nn.Parameter(torch.randn(8, generator=generator).to(DEVICE) * 0.1))
        optimizer = Automagic_Sinkgd(params, **{**SETTINGS, "fused": True, "warmup_steps": 8})
        for _ in range(3):
            flat = torch.zeros(400, device=DEVICE)
            start = 0
            for index, p in enumerate(params):
                shift = 1 if index in (0, 1, 6) else 0  # 4 bytes off: not a 16-byte aligned start
                p.grad = flat[start + shift:start + shift + p.numel()]
                p.grad.copy_(torch.randn(p.numel(), generator=generator).to(DEVICE) * 0.01)
                start += 64
            optimizer.step()
        return storage, params, optimizer

    cpu_storage, cpu_params, cpu_optimizer = run(False)
    offered.clear()
    storage, params, optimizer = run(True)
    assert offered and all(len(lengths) == 1 for lengths in offered), offered
    assert torch.equal(storage[24:], torch.full((40,), 7.0, device=DEVICE))
    for p, q in zip(cpu_params, params):
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(optimizer.state[q]["avg_lr"], cpu_optimizer.state[p]["avg_lr"])


def test_the_padded_stacks_multi_tensor_copies_take_no_unsigned_16_bit_tensors(monkeypatch):
    """The bf16 state's mask codes are uint16; CUDA's multi-tensor copy has no kernel for them, so
    the padded stack copies them as int16 (the same bits)."""
    dtypes = set()
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda rows, sources, *a, **k: dtypes.update(
        {r.dtype for r in rows} | {s.dtype for s in sources}) or real_copy(rows, sources, *a, **k))
    on_gpu, gpu_optimizer = _train_vectors(monkeypatch, True, 4, "bf16", torch.bfloat16)
    assert torch.int16 in dtypes and torch.uint16 not in dtypes, dtypes
    on_cpu, _ = _train_vectors(monkeypatch, False, 4, "bf16", torch.bfloat16)
    assert all(torch.equal(p, q) for p, q in zip(on_cpu, on_gpu))
    assert all(gpu_optimizer.state[p]["lr_mask"].dtype == torch.uint16 for p in on_gpu)


def test_the_gpu_checks_comparison_with_the_cpu_tells_a_defect_from_rounding(monkeypatch):
    """benchmarks/gpu_extras.py compares each tensor's total update on the GPU with the CPU step's
    (1 % allowed). Stood in for on CPU by the GPU's eager choices: they agree within it, and a
    padded stack whose padding counted in the means (a GPU-only defect) is 30x over it."""
    from benchmarks import gpu_extras

    real_trained = gpu_extras._trained_updates

    def trained(device, fused, precision, steps=6, lr_growth=None):
        monkeypatch.setattr(core, "_launch_bound", lambda d: device == "gpu")
        return real_trained("cpu", fused, precision, steps, lr_growth=lr_growth)

    monkeypatch.setattr(gpu_extras, "_trained_updates", trained)
    assert gpu_extras.update_disagreement("gpu", False, "fp32") < 1e-2
    real_means = core._row_means
    monkeypatch.setattr(core, "_row_means", lambda stacked, weights=None, out=None: real_means(stacked, None, out))
    assert gpu_extras.update_disagreement("gpu", False, "fp32") > 0.1

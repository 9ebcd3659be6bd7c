"""Mutation check: break the library one known way at a time and see which tests notice.

Each mutation below is one exact-text substitution in one library file, applied to a temporary copy
of the repository (the working tree is never touched); the listed test files then run there, and
the tests that fail are the ones that catch the mutation. A mutation whose text is no longer found
stops the script with an error: the library changed, and the mutation must be updated with it.

    python tools/mutation_check.py                     # every mutation, a table in Markdown
    python tools/mutation_check.py --only b d          # some of them
    python tools/mutation_check.py --tests-from REV    # the tests of git revision REV (e.g. the
                                                       # suite before a change) against this library

Runs pytest with the interpreter running this script, one thread per process (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = "library/automagic_sinkgd.py"
KERNELS = "library/automagic_sinkgd_kernels.py"

SYNC_TESTS = ("tests/test_automagic_sinkgd.py", "tests/test_state_precision.py", "tests/test_schedule_options.py",
              "tests/test_optim_contract.py", "tests/test_host_sync.py")
ROUNDING_TESTS = ("tests/test_rounding_noise.py", "tests/test_state_precision.py", "tests/test_automagic_sinkgd.py",
                  "tests/test_fused_kernels.py")
DECAY_TESTS = ("tests/test_decay_statistics.py", "tests/test_automagic_sinkgd.py", "tests/test_kohya_hook.py",
               "tests/test_fused_kernels.py")


@dataclass(frozen=True)
class Mutation:
    key: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    select: str = ""  # a pytest -k expression, "" for every test of the files
    also: tuple[tuple[str, str, str], ...] = ()  # further (path, old, new) substitutions, applied together


MUTATIONS = [
    Mutation("a1", "`torch.nonzero(...)` added inside `step()` (a host sync on a GPU)", CORE,
             "            grads = [self._check_grad(p) for _, p in entries]\n",
             "            grads = [self._check_grad(p) for _, p in entries]\n"
             "            torch.nonzero(grads[0])\n",
             SYNC_TESTS, "sync"),
    Mutation("a2", "`.cpu()` of a gradient added inside `step()` (a device-to-host copy on a GPU)", CORE,
             "            grads = [self._check_grad(p) for _, p in entries]\n",
             "            grads = [self._check_grad(p) for _, p in entries]\n"
             "            grads[0].abs().amax().cpu()\n",
             SYNC_TESTS, "sync"),
    Mutation("a2b", "`.to(\"cpu\")` of a gradient added inside `step()` (seen only where it is a copy: meta)", CORE,
             "            grads = [self._check_grad(p) for _, p in entries]\n",
             "            grads = [self._check_grad(p) for _, p in entries]\n"
             "            grads[0].abs().amax().to(\"cpu\")\n",
             SYNC_TESTS, "sync"),
    Mutation("a3", "the fused step's host code reads a flag (`bool(...)`) before its launch", KERNELS,
             "    bf16 = params[0].dtype == torch.bfloat16\n    codec = states[0].get(\"lr_mask_codec\")\n",
             "    bf16 = params[0].dtype == torch.bfloat16\n    codec = states[0].get(\"lr_mask_codec\")\n"
             "    bool(torch.isfinite(stacks[\"avg_lr\"]).all())\n",
             SYNC_TESTS, "sync"),
    Mutation("b", "`_rounding_seed` ignores the step (the same rounding noise every step)", CORE,
             "+ param_index) * 2_654_435_761 + t * 97_531",
             "+ param_index) * 2_654_435_761 + 0 * t * 97_531",
             ROUNDING_TESTS),
    Mutation("b2", "`_rounding_seed` ignores the tensor (every tensor rounds with the same noise)", CORE,
             "+ param_index) * 2_654_435_761 + t * 97_531",
             "+ 0 * param_index) * 2_654_435_761 + t * 97_531",
             ROUNDING_TESTS),
    Mutation("c", "`step_param` never stores the group statistics it gathers (kohya `--fused_backward_pass`)", CORE,
             "            if gather[1] is not None:\n                self._store_stats(group, gather[1], gather[2], gather[3])\n",
             "            if gather[1] is not None:\n                pass\n",
             DECAY_TESTS),
    Mutation("d", "the gradient-aware weight-decay strength replaced by 1 (eager step)", CORE,
             "            decay_theta = gradient_scaled_decay(abs_grad_mean, group_mean, group_std)\n",
             "            decay_theta = 1.0\n",
             DECAY_TESTS),
    Mutation("d2", "the gradient-aware weight-decay strength replaced by 1 (fused kernels)", KERNELS,
             "            theta = 2.0 / (1.0 + tl.exp(-4.0 * z))\n",
             "            theta = 1.0 + 0.0 * z\n",
             ("tests/test_decay_statistics.py", "tests/test_fused_kernels.py")),
    Mutation("d3", "the gradient-aware weight-decay strength replaced by 1 in both (eager and kernels agree)", CORE,
             "            decay_theta = gradient_scaled_decay(abs_grad_mean, group_mean, group_std)\n",
             "            decay_theta = 1.0\n",
             DECAY_TESTS,
             also=((KERNELS, "            theta = 2.0 / (1.0 + tl.exp(-4.0 * z))\n", "            theta = 1.0 + 0.0 * z\n"),)),
    Mutation("e", "a step where no tensor has a gradient still counts a group step", CORE,
             "            if not entries:\n                continue\n"
             "            group[\"lr_max\"] = _running_max(group[\"lr_max\"], group[\"lr\"])\n"
             "            group[\"group_step\"] += 1\n",
             "            group[\"group_step\"] += 1\n            if not entries:\n                continue\n"
             "            group[\"lr_max\"] = _running_max(group[\"lr_max\"], group[\"lr\"])\n",
             ("tests/test_optim_contract.py",), "zero_grad"),
    Mutation("f", "a resumed run with a new total_steps keeps the old decay (extending a run trains nothing)", CORE,
             "            elif group[\"decay_horizon\"] == \"run\" and state.get(\"decay_total\") != group[\"total_steps\"]:\n",
             "            elif False:\n",
             ("tests/test_run_length.py",), "extend or longer"),
    Mutation("g", "a warm-up that ended restarts when a longer run moves its end (its sign history is gone)", CORE,
             "        return ended if ended is not None else _planned_warmup(group)\n",
             "        return _planned_warmup(group)\n",
             ("tests/test_run_length.py",), "extend or longer"),
    Mutation("h", "the multiplicative mask rule falls back to the additive one", CORE,
             "        mask_update_ = rprop_mask_update_ if mask_rule == \"multiplicative\" else automagic_mask_update_\n",
             "        mask_update_ = automagic_mask_update_\n",
             ("tests/test_mask_rule.py",)),
    Mutation("i", "lora_scale_power scales the lr but not the mask bounds", CORE,
             "        for key in cls.LORA_SCALED + (\"initial_lr\", \"mask_min_lr\", \"mask_max_lr\"):\n",
             "        for key in (\"lr\", \"initial_lr\", \"lr_bump\"):\n",
             ("tests/test_lora_scale.py",)),
    Mutation("j", "a resumed run scales the saved learning rates a second time", CORE,
             "    def __setstate__(self, state: dict) -> None:\n",
             "    def __setstate__(self, state: dict) -> None:\n"
             "        for group in state.get(\"param_groups\", []):\n"
             "            group[\"lr\"] = group[\"lr\"] * group.get(\"lora_lr_factor\", 1.0)\n",
             ("tests/test_lora_scale.py",)),
    Mutation("k", "the fused split path takes the eager step's chunks (twice the launches on a GPU)", CORE,
             "                                              kernels.split_chunk_numel(_matrix_shape(members[0][1].shape))):\n",
             "                                              None):\n",
             ("tests/test_gpu_readiness.py",), "large_tensors"),
    Mutation("l", "the split path's partial column sums keep only each block's last tile row", KERNELS,
             "        part = tl.load(col_out_ptr + cols, mask=(cols < C) & not_first, other=0.0) + part\n",
             "        part = part\n",
             ("tests/test_fused_kernels.py",), "split"),
    Mutation("m", "the split path's last launch does not store the step's momentum", KERNELS,
             "                _store_momentum(exp_avg_ptr, offsets, local, inside, _momentum_step(g, m, lerp_weight), table_ptr,\n"
             "                                state_noise_offset, COMPACT)\n",
             "                pass\n",
             ("tests/test_fused_kernels.py",), "split"),
    Mutation("n", "decay_horizon='run' reaches 0 a step before total_steps (a 3-step run trains nothing)", CORE,
             "    steps = warmup_steps if horizon == \"warmup\" else max(1, total_steps - warmup_steps + 1)\n",
             "    steps = warmup_steps if horizon == \"warmup\" else max(1, total_steps - warmup_steps)\n",
             ("tests/test_schedule_options.py", "tests/test_run_length.py")),
    Mutation("o", "the hook takes a resumed fine-tune script's --max_train_steps as the run's whole length "
             "(its steps still to go: the decay has ended, the resumed run trains nothing)", "library/kohya_hook.py",
             "        optimizer._steps_restart_on_resume = not hasattr(args, \"initial_step\")\n",
             "        optimizer._steps_restart_on_resume = False\n",
             ("tests/test_run_length.py", "tests/test_kohya_hook.py")),
    Mutation("p", "max_warmup_steps is ignored (high_performance's short runs never leave warm-up again)", CORE,
             "    return warmup_length(group[\"warmup_steps\"], group[\"total_steps\"], group[\"max_warmup_steps\"])\n",
             "    return warmup_length(group[\"warmup_steps\"], group[\"total_steps\"])\n",
             ("tests/test_run_length.py", "tests/test_presets.py", "tests/test_builtin_rough_edges.py")),
    Mutation("q", "a padded stack of vectors is offered to the fused kernels (they step one shape: past a shorter "
             "vector's end)", CORE,
             "    if _fused_phase(group, phase) and not padded:\n",
             "    if _fused_phase(group, phase):\n",
             ("tests/test_gpu_readiness.py",), "never_reaches"),
    Mutation("r", "a padded stack's mask mean counts its padding (GPU eager step)", CORE,
             "        _row_means(lr_mask, mean_weights, out=avg_lr)\n",
             "        _row_means(lr_mask, None, out=avg_lr)\n",
             ("tests/test_gpu_readiness.py",), "padded or vectors"),
    Mutation("s", "lr_growth: a skipped (NaN) tensor's factor still grows", CORE,
             "    return lr_growth.mul_(agreement.mul_(keep).mul_(growth_rate).exp_()).clamp_(1.0, growth_max)\n",
             "    return lr_growth.mul_(agreement.mul_(growth_rate).exp_()).clamp_(1.0, growth_max)\n",
             ("tests/test_lr_growth.py",)),
    Mutation("t", "lr_growth: the factor also falls below 1 (the one-step signal's bias towards small rates)", CORE,
             "    return lr_growth.mul_(agreement.mul_(keep).mul_(growth_rate).exp_()).clamp_(1.0, growth_max)\n",
             "    return lr_growth.mul_(agreement.mul_(keep).mul_(growth_rate).exp_()).clamp_(0.01, growth_max)\n",
             ("tests/test_lr_growth.py",)),
    Mutation("u", "lr_growth: the factor keeps growing after warm-up (it would undo the post-warm-up decay)", CORE,
             "        self.growing = self.warmup and (growth_steps is None or t <= growth_steps)\n",
             "        self.growing = growth_steps is None or t <= growth_steps\n",
             ("tests/test_lr_growth.py",)),
    Mutation("w", "lr_growth_steps is ignored (the factor adapts over all of warm-up)", CORE,
             "        self.growing = self.warmup and (growth_steps is None or t <= growth_steps)\n",
             "        self.growing = self.warmup\n",
             ("tests/test_lr_growth.py",)),
    Mutation("v", "lr_growth: the factor is kept but never applied to the update", CORE,
             "    if lr_growth is not None:\n        rate = rate * lr_growth\n",
             "",
             ("tests/test_lr_growth.py",)),
    Mutation("x", "fused lr_growth: a skipped (NaN) tensor's factor still grows in the kernels", KERNELS,
             "tl.exp(agreement * finite_f * growth_rate)",
             "tl.exp(agreement * growth_rate)",
             ("tests/test_fused_kernels.py",)),
    Mutation("x2", "fused lr_growth: the one-program kernel's agreement reads the momentum after this step's update",
             KERNELS,
             "                acc_agree += _sign_agreement(g, m)\n            m = _momentum_step(",
             "                acc_agree += _sign_agreement(g, _momentum_step(g, m, lerp_weight))\n"
             "            m = _momentum_step(",
             ("tests/test_fused_kernels.py",)),
    Mutation("y", "fused lr_growth: every row block of a split tensor grows its factor (the first only may)", KERNELS,
             "        if block == 0:  # no other block of this launch reads the factor\n",
             "        if True:\n",
             ("tests/test_fused_kernels.py", "tests/test_gpu_readiness.py")),
    Mutation("z", "fused lr_growth: the kernels grow the factor but never apply it", KERNELS,
             "        brake = brake * growth\n",
             "        brake = brake\n",
             ("tests/test_fused_kernels.py",)),
]


def apply(mutation: Mutation, root: str) -> None:
    """The substitutions, in place under ``root``; fails unless each ``old`` occurs exactly once."""
    for name, old, new in ((mutation.path, mutation.old, mutation.new),) + mutation.also:
        path = os.path.join(root, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        found = text.count(old)
        if found != 1:
            raise SystemExit(f"mutation {mutation.key}: its text occurs {found} times in {name} (expected once); "
                             f"the library changed, update the mutation:\n{old}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))


def copy_repository(destination: str, tests_from: str | None) -> None:
    """The working tree's tracked and untracked (not ignored) files; tests/ from ``tests_from``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):
            continue  # deleted in the working tree
        if tests_from and name.startswith("tests/"):
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)
    if tests_from:
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", destination], input=archive, check=True)


def run_tests(root: str, mutation: Mutation, max_fail: int) -> tuple[int, list[str], float]:
    """(pytest's exit code, the failing tests, seconds) for the mutation's tests under ``root``."""
    files = [f for f in mutation.tests if os.path.exists(os.path.join(root, f))]
    if not files:  # pytest without files would run the whole suite
        return 5, [], 0.0
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", f"--maxfail={max_fail}", *files]
    if mutation.select:
        command += ["-k", mutation.select]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    failed = re.findall(r"^FAILED (\S+)", result.stdout, flags=re.MULTILINE)
    return result.returncode, failed, time.time() - start


def _grouped(failed: list[str]) -> list[str]:
    """Failing test ids grouped by test function: `file::test` [param ids]."""
    groups: dict[str, list[str]] = {}
    for test_id in failed:
        name, _, params = test_id.removeprefix("tests/").partition("[")
        groups.setdefault(name, []).append(params.rstrip("]"))
    return [f"`{name}`" + (f" [{', '.join(p for p in params if p)}]" if any(params) else "")
            for name, params in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutation keys to run (default: all)")
    parser.add_argument("--tests-from", help="take tests/ from this git revision instead of the working tree")
    parser.add_argument("--max-fail", type=int, default=2, help="stop a mutation's run after this many failures")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.key in args.only]
    print(f"tests from: {args.tests_from or 'the working tree'}\n")
    print("| mutation | tests run | caught by |")
    print("|---|---|---|")
    survivors = 0
    for mutation in chosen:
        with tempfile.TemporaryDirectory(prefix="mutation-") as root:
            copy_repository(root, args.tests_from)
            apply(mutation, root)
            code, failed, seconds = run_tests(root, mutation, args.max_fail)
        files = ", ".join(os.path.basename(f) for f in mutation.tests) + (f" (-k {mutation.select})" if mutation.select else "")
        if code == 0:
            caught = "**nothing** (all pass)"
            survivors += 1
        elif failed:
            caught = "<br>".join(_grouped(failed))
            if code == 1 and len(failed) >= args.max_fail:
                caught += f"<br>(stopped after {args.max_fail})"
        elif code == 5:
            caught = "**nothing** (no such tests)"
            survivors += 1
        else:
            caught = f"pytest exit {code} (no test failed: an error)"
            survivors += 1
        print(f"| {mutation.key}: {mutation.what} | {files} | {caught} |", flush=True)
        print(f"  {mutation.key}: {seconds:.0f} s", file=sys.stderr, flush=True)
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()

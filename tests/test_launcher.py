"""train_network_patch.py without sd-scripts: argument handling, preset merging, and full launches
against a stand-in sd-scripts folder whose `library` package collides with ours by name."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train_network_patch as launcher

REPO = Path(launcher.__file__).resolve().parent


# ---------------------------------------------------------------- argument handling (in process)


def test_own_options_are_split_off_and_kohya_options_keep_their_order():
    own, rest = launcher.parse_launcher_args(
        ["--output_dir", "o", "--preset", "lora", "--optimizer_args", "eta=1", "beta1=0.8", "--script",
         "sdxl_train_network", "--noise_offset", "-0.1", "--sd_scripts", "/x"]
    )
    assert (own.preset, own.script, own.sd_scripts, own.backend) == ("lora", "sdxl_train_network", "/x", "auto")
    assert rest == ["--output_dir", "o", "--optimizer_args", "eta=1", "beta1=0.8", "--noise_offset", "-0.1"]


def test_no_abbreviations_of_our_options_swallow_kohya_flags():
    # kohya has --script-like prefixes of nothing, but e.g. "--pre" must not become --preset
    own, rest = launcher.parse_launcher_args(["--pre", "x"])
    assert own.preset is None and rest == ["--pre", "x"]


def test_take_option_forms():
    argv = ["--a", "1", "--optimizer_args", "x=1", "y='b'", "--b", "--optimizer_type=AdamW"]
    values, rest = launcher.take_option(argv, "--optimizer_args", many=True)
    assert values == ["x=1", "y='b'"] and rest == ["--a", "1", "--b", "--optimizer_type=AdamW"]
    values, rest = launcher.take_option(argv, "--optimizer_type")
    assert values == ["AdamW"] and "--optimizer_type=AdamW" not in rest
    assert launcher.take_option(["--c", "2"], "--config_file") == (None, ["--c", "2"])


def read_merged(argv):
    assert argv[0] == "--config_file"
    from library.presets import read_kohya_config

    return read_kohya_config(argv[1]), argv[2:]


def test_preset_under_user_config_under_command_line(tmp_path):
    user = tmp_path / "user.toml"
    user.write_text('[train]\nlearning_rate = 3e-4\noutput_dir = "out"\noptimizer_args = ["beta1=0.8"]\n')
    config, rest = read_merged(launcher.apply_preset(
        "lora", ["--config_file", str(user), "--optimizer_args", "warmup_steps=7", "--seed", "1"]))
    assert config["learning_rate"] == 3e-4 and config["output_dir"] == "out" and config["lr_scheduler"] == "constant"
    args = dict(item.split("=") for item in config["optimizer_args"])
    assert args["beta1"] == "0.8" and args["warmup_steps"] == "7" and args["max_lr"] == "1e-3"
    assert rest == ["--seed", "1"]  # merged into the file; the rest is left for kohya's argparse


def test_a_user_config_that_overrides_the_presets_optimizer_says_so(tmp_path, capsys):
    """A kohya config written for another optimizer, put under --preset, wins over the preset (the
    documented order): the launcher says which of its keys replace the preset's, naming the file
    and the fix, before anything runs; a config without them says nothing."""
    user = tmp_path / "my_lora.toml"
    user.write_text('optimizer_type = "AdamW8bit"\nlearning_rate = 1e-4\noutput_dir = "out"\n')
    config, _ = read_merged(launcher.apply_preset("lora", ["--config_file", str(user)]))
    err = capsys.readouterr().err
    assert config["optimizer_type"] == "AdamW8bit" and "optimizer_args" not in config  # the order is kept
    assert f"{user} sets optimizer_type = 'AdamW8bit', which replaces the preset lora's 'automagic_sinkgd'" in err
    assert f"Remove optimizer_type from {user}" in err

    user.write_text('learning_rate = 1e-4\nlr_scheduler = "cosine"\n')
    launcher.apply_preset("lora", ["--config_file", str(user)])
    err = capsys.readouterr().err
    assert f"{user} sets learning_rate = 0.0001 over the preset lora's 5e-05" in err
    assert f"{user} sets lr_scheduler = 'cosine' over the preset lora's 'constant'" in err

    user.write_text('output_dir = "out"\nlr_scheduler = "constant"\noptimizer_type = "automagic_sinkgd"\n')
    launcher.apply_preset("lora", ["--config_file", str(user)])
    assert " sets " not in capsys.readouterr().err


def test_command_line_optimizer_switch_drops_the_preset_args():
    config, rest = read_merged(launcher.apply_preset("lora", ["--optimizer_type", "AdamW"]))
    assert "optimizer_args" not in config and rest == ["--optimizer_type", "AdamW"]


def test_bad_preset_is_reported_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('optimizer_type = "automagic_sinkgd"\nwarmup = 5\n')
    with pytest.raises(ValueError, match=r"bad\.toml: unknown key 'warmup'"):
        launcher.apply_preset(str(bad), [])


# ---------------------------------------------------------------- launches (subprocess)

FAKE_TRAIN_UTIL = '''
import argparse, ast, toml

def read_config_from_file(args, parser):  # kohya's semantics: flatten one level, CLI wins
    if not args.config_file:
        return args
    flat = {}
    for key, value in toml.load(args.config_file).items():
        flat.update(value) if isinstance(value, dict) else flat.__setitem__(key, value)
    return parser.parse_args(namespace=argparse.Namespace(**flat))

def get_optimizer(args, trainable_params):  # kohya's path for the optimizers it knows
    import torch
    if args.fused_backward_pass:
        assert args.optimizer_type.lower() == "adafactor", "fused_backward_pass currently only works with Adafactor"
    kwargs = {k: ast.literal_eval(v) for k, v in (a.split("=") for a in args.optimizer_args or [])}
    cls = getattr(torch.optim, args.optimizer_type)
    return "kohya:" + cls.__name__, "", cls(trainable_params, lr=args.learning_rate, **kwargs)
'''

FAKE_TRAINER = '''
import argparse, json, os, sys
import torch
import library.train_util as train_util

def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    parser.add_argument("--optimizer_type", default="AdamW")
    parser.add_argument("--optimizer_args", nargs="*")
    parser.add_argument("--learning_rate", type=float, default=2e-6)
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--output_dir")
    parser.add_argument("--fused_backward_pass", action="store_true")
    return parser

if __name__ == "__main__":
    parser = setup_parser()
    args = train_util.read_config_from_file(parser.parse_args(), parser)
    model = torch.nn.Linear(4, 3)
    groups = [{"params": [model.weight], "lr": args.learning_rate}, {"params": [model.bias], "lr": args.learning_rate / 2}]
    name, opt_args, opt = train_util.get_optimizer(args, groups)
    import library
    plain = {k: v for k, v in opt.defaults.items() if isinstance(v, (int, float, bool, str))}
    print("RESULT " + json.dumps({
        "name": name, "args": opt_args, "cls": type(opt).__name__, "defaults": plain,
        "group_lrs": [g["lr"] for g in opt.param_groups], "library": library.__file__, "cwd": os.getcwd(),
        "argv0": sys.argv[0], "output_dir": args.output_dir,
    }))
'''


# kohya's order in train_network.py: get_optimizer, then the resume (accelerate loads the optimizer
# state), then the ss_optimizer metadata from the args string get_optimizer returned.
FAKE_RESUMING_TRAINER = '''
import argparse, json, sys
import torch
import library.train_util as train_util

parser = argparse.ArgumentParser()
parser.add_argument("--config_file")
parser.add_argument("--optimizer_type", default="AdamW")
parser.add_argument("--optimizer_args", nargs="*")
parser.add_argument("--learning_rate", type=float, default=1e-4)
parser.add_argument("--fused_backward_pass", action="store_true")
parser.add_argument("--save_state_to")
parser.add_argument("--resume")
args = train_util.read_config_from_file(parser.parse_args(), parser)
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, [{"params": model.parameters(), "lr": args.learning_rate}])
if args.resume:
    optimizer.load_state_dict(torch.load(args.resume, weights_only=True))
model(torch.randn(2, 4)).sum().backward()
optimizer.step()
if args.save_state_to:
    torch.save(optimizer.state_dict(), args.save_state_to)
ss_optimizer = optimizer_name + (f"({optimizer_args})" if len(optimizer_args) > 0 else "")
print("RESULT " + json.dumps({"ss_optimizer": ss_optimizer, "warmup_steps": optimizer.param_groups[0]["warmup_steps"]}))
'''


@pytest.fixture(scope="module")
def fake_sd_scripts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-scripts")
    (root / "library").mkdir()
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(textwrap.dedent(FAKE_TRAIN_UTIL))
    # the network trainers' parsers have kohya's network options (network_dim None = 4, network_alpha 1)
    network = ('    parser.add_argument("--fused_backward_pass", action="store_true")\n'
               '    parser.add_argument("--network_module")\n'
               '    parser.add_argument("--network_dim", type=int, default=None)\n'
               '    parser.add_argument("--network_alpha", type=float, default=1)\n')
    for script in ("train_network.py", "sdxl_train_network.py"):
        (root / script).write_text(textwrap.dedent(FAKE_TRAINER).replace(
            '    parser.add_argument("--fused_backward_pass", action="store_true")\n', network))
    (root / "fine_tune.py").write_text(textwrap.dedent(FAKE_TRAINER))
    # a full fine-tune script that implements the fused backward pass reads the flag itself
    (root / "sdxl_train.py").write_text(textwrap.dedent(FAKE_TRAINER).replace(
        "    model = torch.nn.Linear(4, 3)\n", "    model = torch.nn.Linear(4, 3)\n    fused = args.fused_backward_pass\n"))
    (root / "resuming_trainer.py").write_text(textwrap.dedent(FAKE_RESUMING_TRAINER))
    return root


def launch(args, cwd, sd_scripts=None):
    env = {k: v for k, v in os.environ.items() if k not in ("SD_SCRIPTS_DIR", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"
    if sd_scripts:
        env["SD_SCRIPTS_DIR"] = str(sd_scripts)
    proc = subprocess.run([sys.executable, str(REPO / "train_network_patch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    return proc, result


def test_launch_from_the_repo_root_runs_kohyas_library_with_our_optimizer(fake_sd_scripts):
    # From our own checkout, sys.path[0] is this repo, whose library/ would shadow kohya's.
    proc, result = launch(["--sd_scripts", str(fake_sd_scripts), "--preset", "lora", "--learning_rate", "2e-4",
                           "--optimizer_args", "warmup_steps=7", "--output_dir", "o"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert Path(result["library"]).parent == fake_sd_scripts / "library"
    assert result["cls"] == "Automagic_Sinkgd"
    assert result["name"] == "automagic_sinkgd_plugin.automagic_sinkgd.Automagic_Sinkgd"
    # command line over the preset, per-group lrs kept, raised by the preset's lora_scale_power at
    # kohya's default network_dim 4 / network_alpha 1 (x4: the lr given is the one for alpha = rank)
    assert result["group_lrs"] == pytest.approx([8e-4, 4e-4])
    assert result["defaults"]["warmup_steps"] == 7  # command line, merged into the preset's args
    assert result["defaults"]["max_lr"] == 1e-3 and result["defaults"]["orthograd"] is True  # preset
    assert result["cwd"] == str(REPO) and result["output_dir"] == "o"
    assert result["argv0"] == str(fake_sd_scripts / "train_network.py")


def test_env_var_script_choice_and_user_config(fake_sd_scripts, tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('[optimizer]\nlearning_rate = 3e-4\noptimizer_args = ["beta1=0.8"]\n')
    proc, result = launch(["--script", "fine_tune", "--preset", "full", "--config_file", str(user)], cwd=tmp_path,
                          sd_scripts=fake_sd_scripts)
    assert proc.returncode == 0, proc.stderr
    assert result["argv0"].endswith("fine_tune.py") and result["cwd"] == str(tmp_path)
    assert result["group_lrs"][0] == 3e-4 and result["defaults"]["beta1"] == 0.8
    assert result["defaults"]["full_finetune"] is True and result["defaults"]["warmup_steps"] == 0.25


def test_other_optimizers_reach_kohya_unchanged(fake_sd_scripts, tmp_path):
    proc, result = launch(["--optimizer_type", "SGD", "--optimizer_args", "momentum=0.9"], cwd=tmp_path,
                          sd_scripts=fake_sd_scripts)
    assert proc.returncode == 0, proc.stderr
    assert result["name"] == "kohya:SGD" and result["defaults"]["momentum"] == 0.9


def test_typo_fails_fast_with_the_closest_key(fake_sd_scripts, tmp_path):
    proc, result = launch(["--preset", "lora", "--optimizer_args", "warmup_step=10"], cwd=tmp_path,
                          sd_scripts=fake_sd_scripts)
    assert proc.returncode == 2 and result is None  # the trainer never started
    assert "no setting 'warmup_step' (did you mean 'warmup_steps'?)" in proc.stderr
    assert "valid keys: min_lr, max_lr" in proc.stderr and "Traceback" not in proc.stderr


def test_without_sd_scripts_a_kohya_only_script_says_how_to_point_to_it(tmp_path):
    proc, _ = launch(["--script", "sdxl_train", "--optimizer_type", "automagic_sinkgd"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "--sd_scripts" in proc.stderr and "SD_SCRIPTS_DIR" in proc.stderr


def test_a_folder_that_is_not_sd_scripts_is_named(tmp_path, monkeypatch):
    with pytest.raises(launcher.LauncherError, match="--sd_scripts=.* is not a kohya-ss sd-scripts folder"):
        launcher.find_sd_scripts(str(tmp_path))
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(tmp_path / "missing"))
    with pytest.raises(launcher.LauncherError, match="SD_SCRIPTS_DIR=.* is not a kohya-ss sd-scripts folder"):
        launcher.find_sd_scripts(None)


def test_unknown_script_lists_the_trainers(fake_sd_scripts):
    with pytest.raises(launcher.LauncherError, match="did you mean .*trainers in .*: fine_tune, resuming_trainer, sdxl_train, sdxl_train_network, train_network"):
        launcher.find_script(fake_sd_scripts, "train_netwrok")


def test_list_and_show_presets(capsys):
    assert launcher.main(["--list_presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("lora", "full", "high_performance"))
    assert launcher.main(["--show_preset", "high_performance"]) == 0
    out = capsys.readouterr().out
    assert "beta1=0.85" in out and 'optimizer_type = "automagic_sinkgd"' in out


def test_builtin_backend_is_told_which_script_to_run(monkeypatch):
    """Without sd-scripts, --script fine_tune must reach the built-in trainer as a full fine-tune."""
    import train_network_patch as launcher

    calls = []

    class RecordingTrainer:
        @staticmethod
        def main(argv, script="train_network"):
            calls.append((list(argv), script))
            return 0

    real_plugin_module = launcher.plugin_module
    monkeypatch.setattr(launcher, "plugin_module",
                        lambda name: RecordingTrainer if name == "builtin.trainer" else real_plugin_module(name))
    monkeypatch.setattr(launcher, "stop_shadowing_kohya_library", lambda: None)  # keep this process's imports
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    for script in ("fine_tune", "train_network"):
        assert launcher.run(["--backend", "builtin", "--script", script, "--max_train_steps", "1"]) == 0
    assert [script for _, script in calls] == ["fine_tune", "train_network"]
    assert all("--max_train_steps" in argv for argv, _ in calls)
    # the built-in train_network is a full fine-tune under --preset full (no trainer mismatch there)
    assert launcher.run(["--backend", "builtin", "--preset", "full", "--max_train_steps", "1"]) == 0
    assert calls[-1][1] == "train_network"


def test_kohya_resume_with_changed_optimizer_args_warns_and_metadata_shows_what_ran(fake_sd_scripts, tmp_path):
    """torch's load_state_dict keeps the saved group settings: the changed warmup_steps is not used."""
    state = tmp_path / "optimizer.bin"
    common = ["--script", "resuming_trainer", "--optimizer_type", "automagic_sinkgd", "--optimizer_args"]
    first, result = launch(common + ["warmup_steps=7", "--save_state_to", str(state)], tmp_path, fake_sd_scripts)
    assert first.returncode == 0, first.stderr[-2000:]
    assert result["ss_optimizer"].endswith("Automagic_Sinkgd(warmup_steps=7)") and "resuming" not in first.stderr
    second, result = launch(common + ["warmup_steps=100", "orthograd=True", "--resume", str(state)], tmp_path,
                            fake_sd_scripts)
    assert second.returncode == 0, second.stderr[-2000:]
    warning = [line for line in second.stderr.splitlines() if "resuming: the saved optimizer state overrides" in line]
    assert len(warning) == 1, second.stderr[-2000:]
    assert "warmup_steps=7 (requested 100)" in warning[0] and "orthograd=False (requested True)" in warning[0]
    assert result["warmup_steps"] == 7
    assert result["ss_optimizer"].endswith("Automagic_Sinkgd(warmup_steps=7,orthograd=False)")


def test_preset_with_a_bad_user_config_names_the_users_file(tmp_path):
    """Before: the error named the launcher's merged temporary file (/tmp/automagic_preset_*.toml)."""
    for body, expected in (("train_batch_size = 2.5\n", "train_batch_size = 2.5 (float) must be an integer"),
                           ("trian_batch_size = 2\n", "unknown argument(s) --trian_batch_size (did you mean "
                                                      "--train_batch_size?)")):
        user = tmp_path / "mine.toml"
        user.write_text(body)
        proc, _ = launch(["--backend", "builtin", "--preset", "lora", "--config_file", str(user)], tmp_path)
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and str(user) in errors[0] and expected in errors[0], proc.stderr[-2000:]
        assert "automagic_preset_" not in proc.stderr


def test_string_optimizer_args_in_a_user_config_under_a_preset(tmp_path):
    """Before: the string was split character by character ("item 'w' is not 'key=value'")."""
    user = tmp_path / "mine.toml"
    user.write_text('optimizer_args = "warmup_steps=10 beta1=0.8"\n')
    config, _ = read_merged(launcher.apply_preset("lora", ["--config_file", str(user)]))
    args = dict(item.split("=") for item in config["optimizer_args"])
    assert args["warmup_steps"] == "10" and args["beta1"] == "0.8" and args["orthograd"] == "True"
    user.write_text('optimizer_args = "warmup_step=10"\n')
    path = launcher.apply_preset("lora", ["--config_file", str(user)])[1]
    with pytest.raises(launcher.LauncherError, match=rf"^{user} \(merged over .*lora.toml\): optimizer_args: .*"
                                                    r"no setting 'warmup_step' \(did you mean 'warmup_steps'\?\)"):
        launcher.check_optimizer_choice(["--config_file", path])


def test_min_lr_above_max_lr_is_named_as_such():
    """Before: 'max_lr=0.001 is out of range', though the user had set min_lr."""
    with pytest.raises(launcher.LauncherError, match=r"min_lr=0.002 is above max_lr=0.001"):
        launcher.check_optimizer_choice(launcher.apply_preset("lora", ["--optimizer_args", "min_lr=2e-3"]))


# ---------------------------------------------------------------- checks before anything loads


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_learning_rate_out_of_range_stops_before_the_trainer_starts(fake_sd_scripts, tmp_path):
    """Before: the pre-check built its stand-in at max_lr, so --learning_rate 1.0 got through and the
    optimizer failed inside the trainer, after the model had loaded, with a traceback."""
    proc, result = launch(["--preset", "lora", "--learning_rate", "1.0"], cwd=tmp_path, sd_scripts=fake_sd_scripts)
    assert proc.returncode == 2 and result is None, proc.stderr[-2000:]
    low, high = lora_preset_bounds()
    assert error_lines(proc) == [
        f"train_network_patch.py: error: --learning_rate=1 is out of range for Automagic_Sinkgd: allowed min_lr "
        f"<= lr <= max_lr, i.e. [{low:g}, {high:g}] (the optimizer_args' min_lr / max_lr); lr=1 is a Prodigy / "
        "D-Adaptation habit, this optimizer takes a real learning rate"]
    assert "1e-6 .. 1e-4" not in proc.stderr  # no second, contradictory range next to the allowed one


def lora_preset_bounds() -> tuple[float, float]:
    from library.optimizer_factory import parse_optimizer_args
    from library.presets import load_preset

    args = parse_optimizer_args(load_preset("lora")["optimizer_args"])
    return args["min_lr"], args["max_lr"]


@pytest.mark.parametrize("argv, where", [
    (["--unet_lr", "5e-3"], "--unet_lr=0.005"),
    (["--text_encoder_lr", "1e-5", "2e-2"], "--text_encoder_lr[1]=0.02"),
    (["--learning_rate_te1", "-1e-5"], "--learning_rate_te1=-1e-05"),
    (["--loraplus_lr_ratio", "40"], "LoRA+ lr (--loraplus_lr_ratio 40 x learning_rate in "),
    (["--unet_lr", "1e-4", "--loraplus_unet_lr_ratio", "16"], "LoRA+ lr (--loraplus_unet_lr_ratio 16 x --unet_lr 0.0001)"),
])
def test_every_group_lr_the_launcher_knows_is_checked(argv, where):
    with pytest.raises(launcher.LauncherError, match=r"is out of range for Automagic_Sinkgd") as error:
        launcher.check_optimizer_choice(launcher.apply_preset("lora", argv))
    assert str(error.value).startswith(where), str(error.value)


def test_learning_rate_from_a_config_file_names_the_file(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text("learning_rate = 0.5\n")
    argv = launcher.apply_preset("lora", ["--config_file", str(user)])
    with pytest.raises(launcher.LauncherError, match=rf"^learning_rate in {user}=0.5 is out of range"):
        launcher.check_optimizer_choice(argv)
    # kohya's "0 = do not train this part" is not an lr; a text-encoder lr kept in range passes
    launcher.check_optimizer_choice(launcher.apply_preset("lora", ["--text_encoder_lr", "0", "--unet_lr", "1e-4"]))


def test_fused_backward_pass_with_accumulation_is_refused_up_front():
    with pytest.raises(launcher.LauncherError, match=r"--fused_backward_pass needs --gradient_accumulation_steps 1"):
        launcher.check_optimizer_choice(launcher.apply_preset(
            "full", ["--fused_backward_pass", "--gradient_accumulation_steps", "4"]))


@pytest.mark.parametrize("preset, script", [("full", "sdxl_train_network"), ("full", "train_network"),
                                            ("full", "flux_train_network"), ("lora", "sdxl_train"),
                                            ("lora", "fine_tune"), ("high_performance", "sd3_train")])
def test_a_preset_on_the_other_kind_of_trainer_is_a_one_line_error(fake_sd_scripts, tmp_path, preset, script):
    """Before: --preset full on sdxl_train_network trained a LoRA with full_finetune=True and bf16 state,
    --preset lora on sdxl_train a full model in LoRA mode, silently."""
    from library.presets import PRESET_TRAINERS

    with pytest.raises(ValueError, match=rf"^--preset {preset} is made for .*; {script} trains .*: use --preset "):
        launcher.run(["--sd_scripts", str(fake_sd_scripts), "--script", script, "--preset", preset])
    assert script not in PRESET_TRAINERS[preset]
    if script == "sdxl_train_network":  # the whole launch: one line, and the trainer never starts
        proc, result = launch(["--script", script, "--preset", preset], cwd=tmp_path, sd_scripts=fake_sd_scripts)
        assert proc.returncode == 2 and result is None and len(error_lines(proc)) == 1, proc.stderr[-2000:]


def test_each_preset_fits_the_trainers_it_names(fake_sd_scripts, tmp_path):
    from library.presets import PRESET_TRAINERS, check_preset_script

    for preset, scripts in PRESET_TRAINERS.items():
        assert all(check_preset_script(preset, script) is None for script in scripts)
    assert check_preset_script(str(REPO / "configs" / "full.toml"), "sdxl_train_network") is None  # a file: yours
    warning = check_preset_script("lora", "train_textual_inversion")  # may be intended: a warning with the reason
    assert "train_textual_inversion is none of them" in warning and "full_finetune" in warning
    proc, result = launch(["--script", "sdxl_train_network", "--preset", "lora", "--output_dir", "o"], cwd=tmp_path,
                          sd_scripts=fake_sd_scripts)
    assert proc.returncode == 0 and result["cls"] == "Automagic_Sinkgd" and "warning" not in proc.stderr


def test_fused_backward_pass_on_a_trainer_that_ignores_it_is_a_one_line_warning(fake_sd_scripts, tmp_path):
    """Before: --fused_backward_pass on a LoRA trainer was silently ignored."""
    proc, result = launch(["--script", "sdxl_train_network", "--preset", "lora", "--fused_backward_pass"],
                          cwd=tmp_path, sd_scripts=fake_sd_scripts)
    assert proc.returncode == 0 and result is not None
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == ["train_network_patch.py: warning: --fused_backward_pass does nothing in sdxl_train_network: "
                        "it steps the optimizer once per step (the full fine-tune scripts sdxl_train, flux_train, "
                        "sd3_train implement it)"]
    proc, result = launch(["--script", "sdxl_train", "--preset", "full", "--fused_backward_pass"], cwd=tmp_path,
                          sd_scripts=fake_sd_scripts)
    assert proc.returncode == 0 and result is not None and "warning" not in proc.stderr, proc.stderr[-2000:]

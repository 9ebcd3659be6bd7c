"""Built-in backend command line: kohya names, kohya --config_file rules, unsupported flags are errors."""

import pytest

from library.builtin import args as cli
from library.builtin.errors import UserError
from library.builtin.trainer import main


def test_defaults_follow_kohya():
    a = cli.parse_args([])
    assert a.caption_extension == ".caption" and a.max_grad_norm == 1.0
    assert a.lr_scheduler == "constant" and a.mixed_precision == "no"


def test_supported_flags_are_not_listed_as_kohya_only():
    dests = {a.dest for a in cli.build_parser()._actions}
    assert not dests & cli.KOHYA_ONLY_FLAGS


@pytest.mark.parametrize("flag", ["--xformers", "--enable_bucket", "--dataset_config=x.toml", "--reg_data_dir"])
def test_unsupported_kohya_flag_is_named(flag):
    with pytest.raises(UserError, match=flag.split("=")[0] + ".*not supported by the built-in backend"):
        cli.parse_args([flag, "x"] if flag == "--reg_data_dir" else [flag])


def test_unknown_flag_is_named_and_prefixes_are_not_guessed():
    with pytest.raises(UserError, match="unknown argument.*--learning_rat\\b"):
        cli.parse_args(["--learning_rat", "1e-4"])
    with pytest.raises(UserError, match="--no_such_flag"):
        cli.parse_args(["--no_such_flag"])


def test_main_prints_error_and_returns_2(capsys):
    assert main(["--xformers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--xformers" in err
    assert main(["--help"]) == 0
    assert "--network_train_unet_only" in capsys.readouterr().out


def test_config_file_flattened_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[optimizer]\noptimizer_type = "AdamW"\nlearning_rate = 1e-4\noptimizer_args = ["weight_decay=0.1", "eps=1e-6"]\n'
        '[training]\nmax_train_steps = 7\nresolution = "64,32"\nxformers = false\n'
    )
    a = cli.parse_args(["--config_file", str(cfg), "--learning_rate", "3e-4", "--optimizer_args", "weight_decay=0.5"])
    assert a.optimizer_type == "AdamW" and a.max_train_steps == 7 and a.resolution == "64,32"
    assert a.learning_rate == 3e-4  # CLI overrides TOML
    assert a.optimizer_args == ["weight_decay=0.5"]  # kohya: the CLI list replaces the TOML list


def test_config_file_unknown_and_unsupported_keys_name_file_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[a]\nxformers = true\n")
    with pytest.raises(UserError, match="--xformers.*bad.toml"):
        cli.parse_args(["--config_file", str(cfg)])
    cfg.write_text("[a]\nlearnin_rate = 1\n")
    with pytest.raises(UserError, match="unknown.*learnin_rate.*bad.toml"):
        cli.parse_args(["--config_file", str(cfg)])
    cfg.write_text("[a]\nmax_train_steps = 'many'\n")
    with pytest.raises(UserError, match="max_train_steps"):
        cli.parse_args(["--config_file", str(cfg)])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cli.parse_args(["--config_file", str(tmp_path / "nope.toml")])


@pytest.mark.parametrize("text,expected", [("512", (512, 512)), ("512,768", (512, 768)), (64, (64, 64))])
def test_resolution(text, expected):
    assert cli.parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["abc", "500", "0", "1,2,3"])
def test_bad_resolution(text):
    with pytest.raises(UserError, match="--resolution"):
        cli.parse_resolution(text)


def test_cross_flag_validation():
    with pytest.raises(UserError, match="networks.lora"):
        cli.validate(cli.parse_args(["--network_module", "networks.lokr"]), full_finetune=False)
    with pytest.raises(UserError, match="exclude each other"):
        cli.validate(cli.parse_args(["--network_train_unet_only", "--network_train_text_encoder_only"]), False)
    with pytest.raises(UserError, match="--save_model_as 'diffusers'"):
        cli.validate(cli.parse_args(["--save_model_as", "diffusers"]), full_finetune=False)
    with pytest.raises(UserError, match="--train_batch_size"):
        cli.validate(cli.parse_args(["--train_batch_size", "0"]), False)


@pytest.mark.parametrize("argv,expected", [
    (["--train_batch_size", "2.5"], "--train_batch_size '2.5': expected an integer"),
    (["--learning_rate", "fast"], "--learning_rate 'fast': expected a number"),
    (["--mixed_precision", "fp8"], "--mixed_precision: invalid choice: 'fp8'"),
])
def test_bad_command_line_value_is_one_line_naming_flag_value_and_type(argv, expected, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: " + expected) and captured.err.count("\n") == 1  # no usage dump
    assert "usage:" not in captured.err + captured.out


def test_unknown_flag_suggests_the_closest_one():
    with pytest.raises(UserError, match=r"--train_batchsize \(did you mean --train_batch_size\?\)"):
        cli.parse_args(["--train_batchsize", "2"])
    with pytest.raises(UserError, match="--no_such_flag on the command line"):  # nothing close: no guess
        cli.parse_args(["--no_such_flag"])


@pytest.mark.parametrize("line,expected", [
    ("train_batch_size = 2.5", "train_batch_size = 2.5 (float) must be an integer"),
    ('network_dim = "8"', "network_dim = '8' (str) must be an integer (write network_dim = 8)"),
    ('learning_rate = "1e-4"', "learning_rate = '1e-4' (str) must be a number"),
    ("max_train_steps = true", "max_train_steps = True (bool) must be an integer"),
    ("output_name = 3", "output_name = 3 (int) must be a string"),
    ("flip_aug = 1", "flip_aug = 1 must be a TOML boolean"),
    ("optimizer_args = [1, 2]", "optimizer_args = [1, 2] must be a list of strings"),
])
def test_config_file_value_of_the_wrong_type_names_file_key_value_and_type(tmp_path, line, expected):
    cfg = tmp_path / "mine.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(UserError) as error:
        cli.parse_args(["--config_file", str(cfg)])
    assert str(error.value).startswith(f"{cfg}: {expected}")


def test_config_file_types_that_mean_the_same_are_accepted(tmp_path):
    cfg = tmp_path / "mine.toml"
    cfg.write_text('network_alpha = 8\nresolution = 64\nlr_warmup_steps = 0.1\noptimizer_args = "weight_decay=0.1 eps=1e-6"\n')
    a = cli.parse_args(["--config_file", str(cfg)])
    assert a.network_alpha == 8.0 and a.resolution == "64" and a.lr_warmup_steps == 0.1
    assert a.optimizer_args == ["weight_decay=0.1", "eps=1e-6"]  # one string: kohya's command-line form

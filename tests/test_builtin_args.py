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
    assert main(["--train_batch_size", "many"]) == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err
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

"""Command line of the built-in backend: kohya's argument names and meanings, kohya's --config_file rules.

Only the flags this backend really implements are accepted. Any other kohya flag is an error naming it
(a flag silently ignored would make a run differ from what the user asked for); a flag kohya does not
know either is reported as unknown.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_MAX_TRAIN_STEPS = 1600  # kohya's default
DEFAULT_OUTPUT_NAME = "last"  # kohya's name when --output_name is not given
DEFAULT_OUTPUT_DIR = "output"
DEFAULT_RESOLUTION = 512  # kohya's; a diffusers folder made for another size trains at its own (trainer.native_resolution)

# Every other flag name of kohya's train_network.py / fine_tune.py (sd-scripts 2026-02). They are
# recognised only to say "kohya has it, this backend does not" instead of "unknown".
KOHYA_ONLY_FLAGS = frozenset(
    """
    adaptive_noise_scale alpha_mask async_upload base_weights base_weights_multiplier blocks_to_swap
    bucket_no_upscale bucket_reso_steps cache_info cache_latents_to_disk cache_text_encoder_outputs
    cache_text_encoder_outputs_to_disk caption_dropout_every_n_epochs caption_dropout_rate caption_extention
    caption_prefix caption_separator caption_suffix caption_tag_dropout_rate color_aug conditioning_data_dir
    cpu_offload_checkpointing dataset_class dataset_config dataset_repeats ddp_gradient_as_bucket_view
    ddp_static_graph ddp_timeout debiased_estimation_loss debug_dataset deepspeed diffusers_xformers
    dim_from_weights disable_mmap_load_safetensors dynamo_backend enable_bucket enable_wildcard
    face_crop_aug_range fp16_master_weights_and_gradients fp8_base fp8_base_unet full_bf16 full_fp16
    fused_backward_pass highvram huber_c huber_scale huber_schedule huggingface_path_in_repo
    huggingface_repo_id huggingface_repo_type huggingface_repo_visibility huggingface_token in_json
    initial_epoch initial_step ip_noise_gamma ip_noise_gamma_random_strength keep_tokens keep_tokens_separator
    log_config log_tracker_config log_tracker_name logit_mean logit_std loss_type lowram lr_decay_steps
    lr_scheduler_args lr_scheduler_min_lr_ratio lr_scheduler_timescale lr_scheduler_type masked_loss
    max_bucket_reso max_timestep max_token_length max_validation_steps mem_eff_attn metadata_author
    metadata_description metadata_is_negative_embedding metadata_license metadata_merged_from
    metadata_preprocessor metadata_tags metadata_thumbnail metadata_title metadata_trigger_phrase
    metadata_usage_hint min_bucket_reso min_timestep mode_scale multires_noise_discount multires_noise_iterations
    network_args network_dropout no_half_vae noise_offset_random_strength offload_optimizer_device
    offload_optimizer_nvme_path offload_param_device offload_param_nvme_path output_config random_crop
    reg_data_dir resize_interpolation resume_from_huggingface save_last_n_epochs save_last_n_epochs_state
    save_last_n_steps save_last_n_steps_state save_n_epoch_ratio save_state_to_huggingface
    scale_v_pred_loss_like_noise_pred scale_weight_norms secondary_separator shuffle_caption skip_cache_check
    text_encoder_batch_size token_warmup_min token_warmup_step tokenizer_cache_dir torch_compile
    use_8bit_adam use_lion_optimizer use_safetensors v_pred_like_loss vae vae_batch_size
    validate_every_n_epochs validate_every_n_steps validation_seed validation_split wandb_api_key
    wandb_run_name weighted_captions weighting_scheme xformers zero3_init_flag zero3_save_16bit_model
    zero_stage zero_terminal_snr lowvram ckpt
    """.split()
)

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
SAMPLERS = ("ddim", "euler", "euler_a", "dpmsolver++", "pndm", "lms", "ddpm")
LORA_FORMATS = ("safetensors", "ckpt", "pt")
FULL_FORMATS = ("diffusers", "diffusers_safetensors", "safetensors", "ckpt")


def _int_or_float(text: str) -> int | float:
    # kohya's lr_warmup_steps: an int is a step count, a float below 1 a ratio of the training steps
    value = float(text)
    return int(value) if value.is_integer() and "." not in str(text) else value


_int_or_float.__name__ = "step count or ratio"  # argparse names the expected type after the function
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", _int_or_float: "a step count or a ratio"}
_ARGPARSE_TYPE_ERROR = re.compile(r"argument (?P<flag>[^:]+): invalid (?P<type>.+?) value: (?P<value>.*)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage (60 lines here) before a bad value; say the flag, the value and
    what is expected in one line instead."""

    def error(self, message: str):
        match = _ARGPARSE_TYPE_ERROR.fullmatch(message)
        if match:
            word = {"int": "an integer", "float": "a number"}.get(match["type"], match["type"])
            message = f"{match['flag']} {match['value']}: expected {word}"
        elif message.startswith("argument "):
            message = message[len("argument "):]
        raise UserError(f"{message} (python train_network_patch.py --help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="train_network_patch.py (built-in backend)",
        description="LoRA / full fine-tune training of a Stable Diffusion model with kohya-style arguments.",
        allow_abbrev=False,  # kohya's parser allows prefixes; here a typo must not pick another flag
    )
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", type=str, default=None,
      help="local diffusers folder or single-file SD checkpoint; default: the embedded tiny model")
    a("--v2", action="store_true", help="single-file checkpoint is SD 2.x")
    a("--v_parameterization", action="store_true", help="v-prediction loss (SD 2.x 768-v models)")
    a("--clip_skip", type=int, default=None, help="use the output of the N-th last CLIP layer")
    # data
    a("--train_data_dir", type=str, default=None,
      help="kohya layout: <repeats>_<name>/ folders of images + captions; default: the embedded dataset")
    a("--caption_extension", type=str, default=".caption", help="extension of caption files (kohya default .caption)")
    a("--resolution", type=str, default=None, help="'SIZE' or 'WIDTH,HEIGHT'; default 512 (or the embedded model's)")
    a("--flip_aug", action="store_true", help="random horizontal flip")
    a("--cache_latents", action="store_true", help="encode every image with the VAE once, before training")
    a("--max_data_loader_n_workers", type=int, default=0, help="DataLoader worker processes (0: load in the main process)")
    a("--persistent_data_loader_workers", action="store_true")
    # steps and batch
    a("--train_batch_size", type=int, default=None, help="default 1 (kohya's); the quick start uses more")
    a("--max_train_steps", type=int, default=None, help=f"default {DEFAULT_MAX_TRAIN_STEPS}")
    a("--max_train_epochs", type=int, default=None, help="overrides max_train_steps")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_grad_norm", type=float, default=1.0, help="0 disables gradient clipping")
    a("--seed", type=int, default=None)
    a("--gradient_checkpointing", action="store_true")
    a("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    a("--sdpa", action="store_true", help="accepted: diffusers already uses scaled-dot-product attention")
    # loss
    a("--noise_offset", type=float, default=None)
    a("--min_snr_gamma", type=float, default=None)
    a("--prior_loss_weight", type=float, default=1.0, help="accepted for kohya configs; no regularisation images here")
    # network
    a("--network_module", type=str, default=None, help="only networks.lora")
    a("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    a("--network_alpha", type=float, default=None, help="LoRA alpha, scale = alpha / dim (default 1, kohya's)")
    a("--network_weights", type=str, default=None, help="start from this LoRA file")
    a("--network_train_unet_only", action="store_true")
    a("--network_train_text_encoder_only", action="store_true")
    a("--train_text_encoder", action="store_true", help="full fine-tune: also train the text encoder")
    # optimizer and schedule
    a("--optimizer_type", type=str, default="", help="default AdamW")
    a("--optimizer_args", type=str, default=None, nargs="*", help='key=value items, e.g. weight_decay=0.01')
    a("--learning_rate", type=float, default=2.0e-6)
    a("--unet_lr", type=float, default=None)
    a("--text_encoder_lr", type=float, default=None)
    a("--learning_rate_te", type=float, default=None, help="full fine-tune: text encoder lr")
    a("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    a("--lr_warmup_steps", type=_int_or_float, default=0)
    a("--lr_scheduler_num_cycles", type=int, default=1)
    a("--lr_scheduler_power", type=float, default=1.0)
    # outputs
    a("--output_dir", type=str, default=None, help=f"default ./{DEFAULT_OUTPUT_DIR}")
    a("--output_name", type=str, default=None, help=f"default {DEFAULT_OUTPUT_NAME!r}")
    a("--save_model_as", type=str, default=None,
      help="LoRA: safetensors (default), ckpt, pt; full fine-tune: diffusers (default) or safetensors/ckpt")
    a("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    a("--save_every_n_steps", type=int, default=None)
    a("--save_every_n_epochs", type=int, default=None)
    a("--save_state", action="store_true", help="also save the training state with every saved model")
    a("--save_state_on_train_end", action="store_true")
    a("--resume", type=str, default=None, help="state folder written by --save_state")
    a("--skip_until_initial_step", action="store_true",
      help="accepted: --resume here always continues at the saved step")
    a("--no_metadata", action="store_true")
    a("--training_comment", type=str, default=None)
    a("--logging_dir", type=str, default=None, help="TensorBoard logs")
    a("--log_with", type=str, default=None, choices=[None, "tensorboard"])
    a("--log_prefix", type=str, default=None)
    # samples
    a("--sample_prompts", type=str, default=None, help="text file, one prompt per line (kohya --n/--w/--h/--d/--s/--l)")
    a("--sample_every_n_steps", type=int, default=None)
    a("--sample_every_n_epochs", type=int, default=None)
    a("--sample_at_first", action="store_true")
    a("--sample_sampler", type=str, default="ddim", choices=SAMPLERS)
    a("--config_file", type=str, default=None, help="kohya TOML: tables flattened one level, CLI wins")
    return p


def _flag_name(token: str) -> str:
    return token[2:].split("=", 1)[0]


def _known_flags() -> list[str]:
    return [a.dest for a in build_parser()._actions if a.dest != "help"]


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, _known_flags(), n=1, cutoff=0.75)
    return f" (did you mean --{close[0]}?)" if close else ""


def _reject_unknown(tokens: list[str], where: str) -> None:
    names = [_flag_name(t) for t in tokens if t.startswith("--")]
    if not names and tokens:
        raise UserError(f"unexpected argument(s) {' '.join(tokens)!r} {where}")
    kohya = [n for n in names if n in KOHYA_ONLY_FLAGS]
    if kohya:
        raise UserError(
            f"kohya flag(s) {', '.join('--' + n for n in kohya)} {where} are not supported by the built-in backend; "
            "remove them, or run with sd-scripts (--sd_scripts DIR or SD_SCRIPTS_DIR) to use them"
        )
    if names:
        raise UserError(f"unknown argument(s) {', '.join('--' + n + _did_you_mean(n) for n in names)} {where}")


def _toml_type_ok(value: Any, expected, key: str) -> bool:
    """TOML already has types: a value of another type is a mistake, not something to convert
    (int(2.5) would train with batch 2, "8" is text). Numbers may be given to resolution (SIZE)."""
    if isinstance(value, bool):
        return False
    if expected is int:
        return isinstance(value, int)
    if expected in (float, _int_or_float):
        return isinstance(value, (int, float))
    if key == "resolution":
        return isinstance(value, (str, int))
    return isinstance(value, str)


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check a TOML value's type and bring it to what argparse would have produced from the command line."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} = {value!r} must be a TOML boolean (true or false)")
        return value
    if action.nargs == "*":
        if isinstance(value, str):  # kohya's command-line form in one string: "key=value key=value"
            value = value.split()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{source}: {key} = {value!r} must be a list of strings, e.g. "
                            f'{key} = ["weight_decay=0.01", "warmup_steps=100"], or one string "k=v k=v"')
        return value
    if value is None:
        return None
    expected = action.type or str
    if not _toml_type_ok(value, expected, key):
        word = _TYPE_WORDS.get(expected, "a string")
        raise UserError(f"{source}: {key} = {value!r} ({type(value).__name__}) must be {word}"
                        + (f" (write {key} = {value})" if isinstance(value, str) and expected in (int, float) else ""))
    try:
        value = expected(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} = {value!r} is not {_TYPE_WORDS.get(expected, 'valid')}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{source}: {key} = {value!r}; allowed: {', '.join(str(c) for c in action.choices if c)}")
    return value


def _read_config(path: str) -> dict:
    # the kohya-semantics reader the launcher's presets use too (tables flattened one level, .toml appended)
    from ..presets import PresetError, read_kohya_config

    try:
        return read_kohya_config(path)
    except PresetError as e:
        raise UserError(f"--config_file: {e}") from None


def _config_namespace(parser: argparse.ArgumentParser, path: str) -> argparse.Namespace:
    from ..presets import source_of  # a launcher-merged file (preset + your file) names where each key came from

    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    values = {}
    for key, value in _read_config(path).items():
        if key == "config_file":
            continue
        source = source_of(path, key)
        if key not in actions:
            if key in KOHYA_ONLY_FLAGS and value in (False, None, "", []):
                continue  # e.g. `xformers = false`: asks for nothing this backend lacks
            _reject_unknown([f"--{key}"], f"(key in {source})")
        values[key] = _coerce(actions[key], key, value, source)
    return argparse.Namespace(**values)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """kohya's order: read --config_file into a namespace, then let the command line override it."""
    parser = build_parser()
    try:
        first, _ = parser.parse_known_args(argv)
        namespace = _config_namespace(parser, first.config_file) if first.config_file else None
        args, unknown = parser.parse_known_args(argv, namespace=namespace)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            raise
        raise UserError("invalid command line") from None
    _reject_unknown(unknown, "on the command line")
    return args


def parse_resolution(text: str | int) -> tuple[int, int]:
    """kohya: '512' -> (512, 512), '512,768' -> (width 512, height 768). Latents need multiples of 8."""
    try:
        parts = [int(x) for x in str(text).replace("x", ",").split(",")]
    except ValueError:
        raise UserError(f"--resolution {text!r}: expected SIZE or WIDTH,HEIGHT") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8 or any(p % 8 for p in parts):
        raise UserError(f"--resolution {text!r}: expected SIZE or WIDTH,HEIGHT, positive multiples of 8")
    return parts[0], parts[1]


def validate(args: argparse.Namespace, full_finetune: bool) -> None:
    """Cross-flag checks kohya also makes, done before any model is loaded."""
    if args.network_module not in (None, "networks.lora"):
        raise UserError(f"--network_module {args.network_module}: the built-in backend implements only networks.lora")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs",
                 "network_dim", "save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps",
                 "sample_every_n_epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.max_data_loader_n_workers < 0:
        raise UserError("--max_data_loader_n_workers must be >= 0")
    if args.lr_warmup_steps < 0:
        raise UserError("--lr_warmup_steps must be >= 0")
    formats = FULL_FORMATS if full_finetune else LORA_FORMATS
    if args.save_model_as is not None and args.save_model_as not in formats:
        mode = "full fine-tune" if full_finetune else "LoRA"
        raise UserError(f"--save_model_as {args.save_model_as!r}: for {mode} use one of {', '.join(formats)}")
    if full_finetune and (args.save_model_as or "diffusers").startswith("diffusers") and args.save_precision in ("fp16", "bf16"):
        raise UserError(f"--save_precision {args.save_precision} applies to single-file models here; a diffusers folder "
                        "is saved in float32 (use --save_model_as safetensors for a half-precision file)")
    if args.resume:
        check_resume_path(args.resume)


def check_resume_path(resume: str) -> None:
    """--resume takes the state folder; a LoRA/model file given instead is named as such, with its folder."""
    path = Path(resume)
    if path.is_file():
        state = path.with_name(path.stem + "-state")  # last.safetensors -> last-state (kohya's naming)
        found = "" if state.is_dir() else " (not there: that save was made without --save_state)"
        raise UserError(f"--resume {resume!r} is a file; --resume takes the state folder written by --save_state "
                        f"next to it: --resume {state}{found}")
    if not path.is_dir():
        raise UserError(f"--resume {resume!r}: no such state folder")

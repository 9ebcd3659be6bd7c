"""Built-in training backend: kohya-style LoRA / full fine-tune of a Stable Diffusion 1.x/2.x model on
torch + diffusers + accelerate, for machines without sd-scripts.

    main(argv, script="train_network") -> exit code

Modes: LoRA (kohya's train_network.py, networks.lora) by default; full fine-tune of the U-Net (kohya's
fine_tune.py) when script == "fine_tune" or the optimizer args say full_finetune=True (the "full" preset).

Reproducibility: all randomness of training (batch order and flips: data.BatchOrder; each example's VAE
sample, noise and timestep: example_generator) is drawn from generators seeded with (seed, epoch) or
(seed, position of the example in the run), never from global RNG state. A run resumed from --save_state
therefore replays exactly the steps an uninterrupted run would take and ends with bit-identical weights on
CPU, and N processes with batch B see the same examples and noise as one process with batch N*B.

Multi-process (accelerate launch): the trained modules are wrapped in DistributedDataParallel by
accelerate, each process trains on its own slice of every batch, only the main process writes files,
and at the end every process checks that its weights hash equal to the others'.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import args as cli
from . import checkpoint, lora, sampling, sd_checkpoint
from .atomic import atomic_dir, atomic_write, check_writable, clean_stale_temporaries
from .data import BatchOrder, ImageDataset, collate, scan_dataset
from .errors import UserError, warn

# The quick start (embedded model and dataset, none of these flags given): enough for the concept to show in
# the samples within the time budget of a 2-core CPU, with the lora preset as it is.
MASK_HISTOGRAM_EVERY = 10  # logged steps whose step number is a multiple of this get the mask histograms
QUICK_START = {"max_train_steps": 300, "train_batch_size": 4, "network_dim": 4, "network_alpha": 4.0, "seed": 42}
KOHYA_DEFAULTS = {"train_batch_size": 1, "network_dim": 4, "network_alpha": 1.0}


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything resolved from the arguments before a model is loaded."""

    args: object
    full_finetune: bool
    model_path: str
    embedded_model: bool
    train_data_dir: str
    caption_extension: str
    output_dir: Path
    output_name: str
    seed: int
    prompts: list = field(default_factory=list)
    quick_start: bool = False  # the embedded model and dataset, with the demo's defaults and prompts


def _wants_full_finetune(script: str, optimizer_args: list[str] | None) -> bool:
    """kohya's fine_tune.py, or the optimizer told to run in full fine-tune mode (the "full" preset)."""
    from ..optimizer_factory import OptimizerArgsError, parse_optimizer_args

    if script == "fine_tune":
        return True
    try:
        return bool(parse_optimizer_args(optimizer_args or []).get("full_finetune", False))
    except OptimizerArgsError as e:
        raise UserError(f"--optimizer_args: {e}") from None


def _apply_defaults(args, quick_start: bool) -> None:
    """kohya's defaults, or the quick start's where the user left a value out."""
    if quick_start and args.max_train_epochs is None:
        args.max_train_steps = args.max_train_steps or QUICK_START["max_train_steps"]
    for name, kohya_default in KOHYA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK_START[name] if quick_start else kohya_default)
    if quick_start and args.seed is None:
        args.seed = QUICK_START["seed"]  # the README's grid is reproducible; kohya draws a random seed


def resolve(args, script: str) -> Setup:
    """Arguments -> Setup: mode, model and dataset paths (the embedded ones when not given), defaults, seed."""
    full = _wants_full_finetune(script, args.optimizer_args)
    cli.validate(args, full)
    own_model, own_data = args.pretrained_model_name_or_path is not None, args.train_data_dir is not None
    if not (own_model and own_data):
        from . import default_model as embedded
    model_path = args.pretrained_model_name_or_path if own_model else embedded.ensure_default_model()
    if own_data:
        train_data_dir, caption_extension = args.train_data_dir, args.caption_extension
    else:  # the embedded dataset ships .txt captions
        train_data_dir = embedded.ensure_default_dataset(str(embedded.default_cache_dir() / "default_dataset"))
        caption_extension = ".txt"
    quick_start = not (own_model or own_data)
    prompts = []
    if args.sample_prompts:
        prompts = sampling.read_prompt_file(args.sample_prompts)
    elif quick_start:  # the demo prompts mean nothing for the user's own data
        prompts = [sampling.SamplePrompt(p, steps=embedded.SAMPLE_STEPS, scale=embedded.SAMPLE_GUIDANCE)
                   for p in embedded.SAMPLE_PROMPTS]
    if args.resolution is None:
        args.resolution = str(native_resolution(model_path) or cli.DEFAULT_RESOLUTION)
    _apply_defaults(args, quick_start=quick_start)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    return Setup(args, full, model_path, not own_model, train_data_dir, caption_extension,
                 Path(args.output_dir or cli.DEFAULT_OUTPUT_DIR), args.output_name or cli.DEFAULT_OUTPUT_NAME,
                 seed, prompts, quick_start)


def native_resolution(model_path: str) -> int | None:
    """The picture size a diffusers folder's U-Net was built for (latent size x the VAE's downscale), or None.

    kohya's default of 512 px is SD 1.x's; a model made for other sizes (the embedded 32 px one, a 768 px
    SD 2.x) trains at its own size when --resolution is not given, instead of silently at 512.
    """
    folder = Path(model_path)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a single-file checkpoint, or a folder load_pipeline will report on
    return size if isinstance(size, int) and size >= 8 and size % 8 == 0 else None


def load_pipeline(path: str):
    """A local diffusers folder, or a single-file SD 1.x/2.x checkpoint diffusers can read offline."""
    import diffusers

    p = Path(path)
    common = {"safety_checker": None, "requires_safety_checker": False}
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise UserError(f"--pretrained_model_name_or_path {path!r} is a folder without model_index.json "
                            "(expected a diffusers StableDiffusionPipeline folder)")
        cls_name = json.loads(index.read_text()).get("_class_name", "")
        if cls_name not in ("StableDiffusionPipeline", ""):
            raise UserError(f"--pretrained_model_name_or_path {path!r} is a {cls_name}; the built-in backend trains "
                            "SD 1.x/2.x (StableDiffusionPipeline) models; use sd-scripts for others")
        return diffusers.StableDiffusionPipeline.from_pretrained(str(p), local_files_only=True, **common)
    if p.is_file():
        try:
            return diffusers.StableDiffusionPipeline.from_single_file(str(p), local_files_only=True, **common)
        except Exception as e:  # usually: the model config is not in the local Hugging Face cache
            raise UserError(
                f"cannot load single-file checkpoint {path!r} offline ({type(e).__name__}: {e}). Convert it to a "
                "diffusers folder once, or make its config available in the Hugging Face cache"
            ) from None
    raise UserError(f"--pretrained_model_name_or_path {path!r} does not exist")


def compute_max_steps(args, batches_per_epoch: int) -> int:
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_epochs is not None:  # kohya: epochs win over steps
        return args.max_train_epochs * steps_per_epoch
    return args.max_train_steps if args.max_train_steps is not None else cli.DEFAULT_MAX_TRAIN_STEPS


def example_generator(seed: int, slot: int) -> torch.Generator:
    """The random stream of one training example (VAE sample, noise, timestep): a function of (seed, slot)
    only, so it is the same after a resume and however the batch is split over processes. A CPU
    generator, so the numbers do not depend on the device either."""
    key = hashlib.sha256(f"{seed}/{slot}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def _randn(shape, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])


def weights_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _warmup_steps(value, max_steps: int) -> int:
    return int(value * max_steps) if isinstance(value, float) and value < 1 else int(value)


def make_lr_scheduler(args, optimizer, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=_warmup_steps(args.lr_warmup_steps, max_steps),
                         num_training_steps=max_steps, num_cycles=args.lr_scheduler_num_cycles,
                         power=args.lr_scheduler_power)


# ----------------------------------------------------------------------------------------------- model


def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    # cast only when needed: diffusers warns on every .to(dtype), even a no-op one
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


class Model:
    """The pipeline's parts, what is trained, and the loss of one micro-batch."""

    def __init__(self, setup: Setup, accelerator):
        args = setup.args
        self.args, self.full = args, setup.full_finetune
        self.accelerator = accelerator
        self.pipe = load_pipeline(setup.model_path)
        pipe = self.pipe
        self.unet, self.text_encoder, self.vae, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # a tokenizer saved without model_max_length reports a huge number: the text encoder's limit decides
        self.max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        self.v_prediction = args.v_parameterization or self.noise_scheduler.config.prediction_type == "v_prediction"
        # frozen parts may live in the mixed-precision dtype (as kohya does); trained weights stay float32
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        device = accelerator.device
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)
            module.eval()
        _place(self.vae, device, torch.float32 if self.weight_dtype == torch.float16 else self.weight_dtype)
        self.train_unet = self.train_text_encoder = False
        self.lora_modules: list[lora.LoRAModule] = []
        if self.full:
            self._setup_full(device)
        else:
            self._setup_lora(device)
        if args.gradient_checkpointing:
            if self.train_unet:
                self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()

    def _setup_lora(self, device) -> None:
        args = self.args
        dim = args.network_dim
        alpha = args.network_alpha if args.network_alpha else dim  # kohya: alpha 0 means no scaling
        _place(self.unet, device, self.weight_dtype)
        _place(self.text_encoder, device, self.weight_dtype)
        self.train_unet = not args.network_train_text_encoder_only
        self.train_text_encoder = not args.network_train_unet_only
        self.te_loras = lora.inject(self.text_encoder, lora.TEXT_ENCODER_PREFIX, lora.TEXT_ENCODER_TARGETS, dim,
                                    alpha) if self.train_text_encoder else []
        self.unet_loras = lora.inject(self.unet, lora.UNET_PREFIX, lora.UNET_TARGETS, dim, alpha) if self.train_unet else []
        self.lora_modules = self.te_loras + self.unet_loras
        for m in self.lora_modules:
            m.to(device, dtype=torch.float32)
            m.requires_grad_(True)
        if args.network_weights:
            state = checkpoint.load_weights(args.network_weights)
            try:
                lora.load_kohya_state_dict(self.lora_modules, state, args.network_weights)
            except ValueError as e:
                raise UserError(str(e)) from None
        self.dim, self.alpha = dim, alpha

    def _setup_full(self, device) -> None:
        args = self.args
        _place(self.unet, device, torch.float32)
        self.unet.requires_grad_(True)
        self.train_unet = True
        self.train_text_encoder = args.train_text_encoder
        _place(self.text_encoder, device, torch.float32 if self.train_text_encoder else self.weight_dtype)
        if self.train_text_encoder:
            self.text_encoder.requires_grad_(True)

    # --- what is trained

    def param_groups(self) -> tuple[list[dict], list[str]]:
        """kohya's group order: text encoder first, then U-Net; each with its own lr."""
        args = self.args
        groups, names = [], []
        if self.full:
            if self.train_text_encoder:
                te_lr = args.learning_rate_te if args.learning_rate_te is not None else args.learning_rate
                groups.append({"params": [p for p in self.text_encoder.parameters()], "lr": te_lr})
                names.append("textencoder")
            groups.append({"params": [p for p in self.unet.parameters()], "lr": args.learning_rate})
            names.append("unet")
            return groups, names
        if self.te_loras:
            lr = args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
            groups.append({"params": [p for m in self.te_loras for p in m.parameters()], "lr": lr})
            names.append("textencoder")
        if self.unet_loras:
            lr = args.unet_lr if args.unet_lr is not None else args.learning_rate
            groups.append({"params": [p for m in self.unet_loras for p in m.parameters()], "lr": lr})
            names.append("unet")
        return groups, names

    def trained_modules(self) -> list[torch.nn.Module]:
        return [m for m, on in ((self.text_encoder, self.train_text_encoder), (self.unet, self.train_unet)) if on]

    def trainable_tensors(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups()[0] for p in g["params"]]

    def state_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights only: the kohya LoRA dict, or the U-Net (+ text encoder) with prefixes."""
        if not self.full:
            return lora.kohya_state_dict(self.lora_modules)
        out = {f"unet.{k}": v for k, v in self._unwrap(self.unet).state_dict().items()}
        if self.train_text_encoder:
            out.update({f"text_encoder.{k}": v for k, v in self._unwrap(self.text_encoder).state_dict().items()})
        return out

    def load_state_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        try:
            if not self.full:
                lora.load_kohya_state_dict(self.lora_modules, tensors, source)
                return
            for prefix, module in (("unet.", self.unet), ("text_encoder.", self.text_encoder)):
                part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if part:
                    self._unwrap(module).load_state_dict(part, strict=True)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{source}: the saved weights do not fit this model/settings: {e}") from None

    def _unwrap(self, module):
        return self.accelerator.unwrap_model(module)

    def set_train(self, training: bool) -> None:
        for m in self.trained_modules():
            m.train(training)

    # --- loss

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.accelerator.device)
        clip_skip = self.args.clip_skip
        with contextlib.nullcontext() if self.train_text_encoder else torch.no_grad():
            if clip_skip and clip_skip > 1:
                out = self.text_encoder(ids, output_hidden_states=True)
                hidden = out.hidden_states[-clip_skip]
                te = self._unwrap(self.text_encoder)
                norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 has no text_model level
                return norm(hidden.to(norm.weight.dtype))  # hidden states may come out of autocast as float32
            return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.accelerator.device, dtype=self.vae.dtype)).latent_dist
        noise = _randn(dist.mean.shape[1:], generators).to(dist.mean.device, dist.mean.dtype)
        latents = dist.mean + dist.std * noise  # = dist.sample(), drawn from each example's own generator
        return (latents * self.vae.config.scaling_factor).float()

    def loss(self, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator]) -> torch.Tensor:
        args, device = self.args, self.accelerator.device
        noise = _randn(latents.shape[1:], generators)
        if args.noise_offset:
            noise = noise + args.noise_offset * _randn((latents.shape[1], 1, 1), generators)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            hidden = self.encode_text(captions)
            pred = self.unet(noisy.to(torch.float32 if self.full else self.weight_dtype), timesteps, hidden).sample
        target = self.noise_scheduler.get_velocity(latents, noise, timesteps) if self.v_prediction else noise
        per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr_gamma:
            per_example = per_example * self._min_snr_weight(timesteps)
        return per_example.mean()

    def _min_snr_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        # Min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction
        alphas = self.noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=self.args.min_snr_gamma)
        return weight / (snr + 1) if self.v_prediction else weight / snr

    # --- outputs

    def sample(self, setup: Setup, size: tuple[int, int]) -> list:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self._unwrap(self.text_encoder), tokenizer=self.tokenizer,
            unet=self._unwrap(self.unet), scheduler=sampling.make_scheduler(self.args.sample_sampler, self.pipe.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        self.set_train(False)
        try:
            return sampling.generate(pipe, setup.prompts, size, setup.seed, self.accelerator.autocast)
        finally:
            self.set_train(True)

    def save_model(self, setup: Setup, path_stem: Path, metadata: dict[str, str]) -> Path:
        dtype = checkpoint.SAVE_DTYPES[self.args.save_precision]
        if not self.full:
            fmt = self.args.save_model_as or "safetensors"
            path = path_stem.with_name(path_stem.name + "." + fmt)
            return checkpoint.save_weights(path, lora.kohya_state_dict(self.lora_modules, dtype),
                                           None if self.args.no_metadata else metadata)
        from diffusers import StableDiffusionPipeline

        unet, te = self._unwrap(self.unet), self._unwrap(self.text_encoder)
        fmt = self.args.save_model_as or "diffusers"
        if fmt in ("diffusers", "diffusers_safetensors"):
            pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=te, tokenizer=self.tokenizer, unet=unet,
                                           scheduler=self.pipe.scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
            with atomic_dir(path_stem) as tmp:
                pipe.save_pretrained(str(tmp), safe_serialization=True)
            return path_stem
        # kohya's single-file choice: the original SD layout that from_single_file and other SD tools read
        tensors = sd_checkpoint.to_original_checkpoint(unet, self.vae, te)
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        path = path_stem.with_name(f"{path_stem.name}.{fmt}")
        if fmt == "ckpt":  # the original .ckpt wraps the weights in {"state_dict": ...}
            return atomic_write(path, lambda tmp: torch.save({"state_dict": tensors}, tmp))
        return checkpoint.save_weights(path, tensors, None if self.args.no_metadata else metadata)


# ----------------------------------------------------------------------------------------------- metadata


def training_metadata(setup: Setup, model: Model, optimizer_name: str, optimizer_args: str, steps: int, epoch: int,
                  n_images: int, batches_per_epoch: int, max_steps: int, started: float) -> dict[str, str]:
    """kohya-style `ss_*` metadata (all values strings, as safetensors requires); network keys for LoRA only."""
    args = setup.args
    v2 = bool(args.v2 or getattr(model.pipe.unet.config, "cross_attention_dim", 768) == 1024)
    meta = {} if model.full else {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(model.dim),
        "ss_network_alpha": str(float(model.alpha)),
        "ss_network_args": "null",
    }
    meta.update({
        "ss_optimizer": f"{optimizer_name}({optimizer_args})" if optimizer_args else optimizer_name,
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr if args.unet_lr is not None else args.learning_rate),
        "ss_text_encoder_lr": str(args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate),
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": str(args.lr_warmup_steps),
        "ss_max_grad_norm": str(args.max_grad_norm),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": "False",
        "ss_batch_size_per_device": str(args.train_batch_size),
        "ss_num_train_images": str(n_images),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(math.ceil(max_steps * args.gradient_accumulation_steps / batches_per_epoch)),
        "ss_max_train_steps": str(max_steps),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_seed": str(setup.seed),
        "ss_resolution": str(tuple(cli.parse_resolution(args.resolution or 512))),
        "ss_clip_skip": str(args.clip_skip),
        "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.min_snr_gamma),
        "ss_network_train_unet_only": str(bool(args.network_train_unet_only)),
        "ss_network_train_text_encoder_only": str(bool(args.network_train_text_encoder_only)),
        "ss_v2": str(v2),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_sd_model_name": os.path.basename(os.path.normpath(setup.model_path)),
        "ss_output_name": setup.output_name,
        "ss_training_comment": str(args.training_comment),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_caption_extension": setup.caption_extension,
        "ss_dataset_dirs": json.dumps({os.path.basename(setup.train_data_dir.rstrip("/")): {"img_count": n_images}}),
    })
    return meta


# ----------------------------------------------------------------------------------------------- training


class _Batches(torch.utils.data.Sampler):
    """Index lists for micro-batches first..last-1 of this process (DataLoader batch_sampler)."""

    def __init__(self, order: BatchOrder, first: int, last: int, rank: int):
        self.order, self.first, self.last, self.rank = order, first, last, rank

    def __iter__(self):
        return (self.order.batch(g, self.rank) for g in range(self.first, self.last))

    def __len__(self) -> int:
        return self.last - self.first


def _effective_lr_text(optimizer, names: list[str]) -> dict[str, float]:
    """Scheduler lr per group, and the optimizer's own effective lr when it reports one (Automagic)."""
    out = {f"lr/{n}": float(g["lr"]) for n, g in zip(names, optimizer.param_groups)}
    if hasattr(optimizer, "effective_lrs"):
        for n, value in zip(names, optimizer.effective_lrs()):
            out[f"lr/effective/{n}"] = float(value)  # one host sync per group, only when displayed/logged
    return out


def _short(log_name: str) -> str:
    """'lr/effective/textencoder' -> 'eff_lr_te': keeps the progress bar on one line."""
    name = log_name.replace("lr/effective/", "eff_lr_").replace("lr/", "lr_")
    return name.replace("textencoder", "te")


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


class Run:
    """One training run, its parts built in __init__, then `train()`: restore, loop, final outputs.

    Only the main process writes files and draws samples; the others wait at the same points.
    """

    def __init__(self, setup: Setup):
        from accelerate import Accelerator

        from ..optimizer_factory import OptimizerArgsError, build_optimizer, describe_lora_scaling

        self.setup, self.args = setup, setup.args
        args = self.args
        if args.logging_dir and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--logging_dir writes TensorBoard logs: pip install tensorboard "
                            "(or the plugin's [logging] extra)")
        # cpu=True on a machine without an accelerator makes a torchrun / `accelerate launch --multi_gpu` start
        # use torch.distributed over gloo (accelerate's MULTI_CPU) instead of N unrelated single processes
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not _has_accelerator(),
                                       log_with="tensorboard" if args.logging_dir else None,
                                       project_dir=args.logging_dir)
        acc = self.accelerator
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        if acc.device.type == "cpu" and setup.embedded_model and "OMP_NUM_THREADS" not in os.environ:
            # the embedded model's layers are tiny: extra threads only add synchronisation, and on a busy
            # machine spinning OpenMP threads made steps ~7x slower (measured: 2.0 s vs 0.27 s per step)
            torch.set_num_threads(1)
        if self.main:
            check_writable(setup.output_dir)
            for folder in (setup.output_dir, setup.output_dir / "sample"):
                for line in clean_stale_temporaries(folder):
                    print(line, file=sys.stderr, flush=True)
        self.size = cli.parse_resolution(args.resolution or 512)
        # one copy of dataset warnings is enough
        self.examples = scan_dataset(setup.train_data_dir, setup.caption_extension,
                                     warn=warn if self.main else (lambda message: None))
        self.accum = args.gradient_accumulation_steps
        self.order = self._batch_order()
        self.max_steps = compute_max_steps(args, self.order.batches_per_epoch)

        torch.manual_seed(setup.seed)  # the LoRA down-projections' random init (kohya: set_seed at start)
        self.model = Model(setup, acc)
        groups, self.group_names = self.model.param_groups()
        try:
            # optimizer_args follows a --resume: it reads as the settings the loaded state put in effect;
            # the run's length goes to Automagic_Sinkgd as total_steps unless the user set it
            self.optimizer_name, self.optimizer_args, self.optimizer = build_optimizer(
                args.optimizer_type or "AdamW", groups, args.learning_rate, args.optimizer_args or [],
                report=warn if self.main else (lambda message: None), run_length=self.max_steps,
                lora_scale=None if setup.full_finetune else self.model.alpha / self.model.dim)
        except (OptimizerArgsError, ValueError, TypeError, ImportError, AttributeError) as e:
            raise UserError(f"--optimizer_type {args.optimizer_type or 'AdamW'} / --optimizer_args: {e}") from None
        scaling = describe_lora_scaling(self.optimizer)
        if self.main and scaling and not args.resume:
            print(scaling, flush=True)
        if self.main and not args.resume:  # a resumed run follows the state's warm-up; its first run said it
            outlasts = warmup_outlasts_run(self.optimizer, self.max_steps)
            if outlasts:
                warn(outlasts)
        self.lr_scheduler = make_lr_scheduler(args, self.optimizer, self.max_steps)
        self.start_step, self.losses, self.lr_history = 0, [], {}
        self.columns: dict[str, list] = {}  # sample images per stage, for the grid
        self.started = time.time()

    def _batch_order(self) -> BatchOrder:
        return BatchOrder(len(self.examples), self.args.train_batch_size, self.world, self.setup.seed,
                          self.args.flip_aug)

    # --- before the loop

    def restore(self, folder: str) -> None:
        """Continue a --save_state folder: weights, optimizer, scheduler, step and loss history."""
        weights, opt_state, sched_state, train_state = checkpoint.read_state(folder)
        self._check_same_data(folder, train_state)
        self.model.load_state_weights(weights, folder)
        try:
            self.optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError) as e:
            raise UserError(f"--resume {folder}: optimizer state does not fit this run "
                            f"(same --optimizer_type and trained modules needed): {e}") from None
        self.lr_scheduler.load_state_dict(sched_state)
        self.start_step = int(train_state["current_step"])
        self.losses, self.lr_history = list(train_state.get("losses", [])), dict(train_state.get("lrs", {}))
        if self.args.seed is None:  # the order of the remaining batches depends on the seed
            self.setup.seed = int(train_state["seed"])
            self.order = self._batch_order()
        if self.start_step >= self.max_steps:
            raise UserError(f"--resume {folder} is at step {self.start_step}, not below --max_train_steps {self.max_steps}")
        if self.main:
            print(f"resumed at step {self.start_step} of {self.max_steps} from {folder}", flush=True)

    def _check_same_data(self, folder: str, train_state: dict) -> None:
        """A state made on the user's data resumes on that data: without --train_data_dir this run would
        continue on the embedded demo dataset (and its seed), silently training something else."""
        saved = train_state.get("train_data_dir")  # states written before this check have none
        if saved is None:
            return
        saved_embedded, now_embedded = bool(train_state.get("embedded_dataset")), self.setup.args.train_data_dir is None
        if saved_embedded == now_embedded and (now_embedded or os.path.abspath(saved) == os.path.abspath(
                self.setup.train_data_dir)):
            return
        if not saved_embedded and now_embedded:
            raise UserError(f"--resume {folder} was trained on --train_data_dir {saved}; pass the same "
                            "--train_data_dir (this run would continue on the built-in demo dataset)")
        if saved_embedded:
            raise UserError(f"--resume {folder} was trained on the built-in demo dataset; drop --train_data_dir "
                            "to continue it, or start without --resume")
        if self.main:
            warn(f"--resume {folder} was trained on --train_data_dir {saved}; continuing on "
                 f"{self.setup.train_data_dir}")

    def _prepare(self) -> None:
        """accelerate wraps what is trained (DDP with several processes); the frozen rest stays as it is."""
        model, acc, args = self.model, self.accelerator, self.args
        if model.train_unet:
            model.unet = acc.prepare(model.unet)
        if model.train_text_encoder:
            model.text_encoder = acc.prepare(model.text_encoder)
        self.raw_optimizer = self.optimizer  # effective_lrs() lives on the optimizer itself
        self.optimizer = acc.prepare(self.optimizer)
        model.set_train(True)
        self.trainable = model.trainable_tensors()
        dataset = ImageDataset(self.examples, self.size)
        self.latent_cache = _cache_latents(model, dataset, self.setup.seed) if args.cache_latents else None
        dataset.with_pixels = self.latent_cache is None
        workers = 0 if self.latent_cache else args.max_data_loader_n_workers
        sampler = _Batches(self.order, self.start_step * self.accum, self.max_steps * self.accum, self.rank)
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                                  num_workers=workers,
                                                  persistent_workers=bool(workers and args.persistent_data_loader_workers))

    # --- the loop

    def _micro_batch(self, batch: dict, sync: bool) -> torch.Tensor:
        model, acc = self.model, self.accelerator
        generators = [example_generator(self.setup.seed, slot) for slot in batch["slot"]]
        if self.latent_cache is not None:
            latents = torch.stack([self.latent_cache[(i, f)] for i, f in zip(batch["index"], batch["flip"])])
            latents = latents.to(acc.device)
        else:
            latents = model.encode_images(batch["pixels"], generators)
        with contextlib.ExitStack() as ctx:
            if not sync and self.world > 1:  # gradients are all-reduced once, on the last micro-batch
                for m in model.trained_modules():
                    ctx.enter_context(acc.no_sync(m))
            loss = model.loss(latents, batch["caption"], generators)
            acc.backward(loss / self.accum)
        return loss.detach() / self.accum

    def _record(self, done: int, pending: list[torch.Tensor], progress) -> None:
        """Losses and lrs into the history, the progress bar and TensorBoard (host syncs happen here only)."""
        values = torch.stack(pending).view(-1, self.accum).sum(dim=1).tolist()
        pending.clear()
        self.losses.extend(values)
        lrs = _effective_lr_text(self.raw_optimizer, self.group_names)
        for k, v in lrs.items():
            self.lr_history.setdefault(k, []).append((done, v))
        window = self.losses[-100:]
        average = sum(window) / len(window)
        progress.set_postfix({"loss": f"{average:.4f}", **{_short(k): f"{v:.2e}" for k, v in lrs.items()}},
                             refresh=False)
        if self.args.logging_dir:
            self.accelerator.log({"loss/current": values[-1], "loss/average": average, **lrs}, step=done)
            if done % MASK_HISTOGRAM_EVERY == 0 or done == self.max_steps:
                self._log_mask_histograms(done)

    def _log_mask_histograms(self, done: int) -> None:
        """Automagic's mask per param group as a TensorBoard histogram (a sample of each tensor)."""
        from ..lr_mask_view import mask_histograms

        if not self.main or not hasattr(self.raw_optimizer, "effective_lrs"):
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for name, values in zip(self.group_names, mask_histograms(self.raw_optimizer)):
            if values is not None:
                writer.add_histogram(f"lr_mask/{name}", values.float().cpu(), done)

    def train(self) -> None:
        from tqdm.auto import tqdm

        args, setup = self.args, self.setup
        if args.resume:
            self.restore(args.resume)
        self._prepare()
        if args.logging_dir:
            self.accelerator.init_trackers(args.log_prefix or "network_train", config={"seed": setup.seed})
        if self.main:
            print(f"built-in backend: {'full fine-tune' if setup.full_finetune else 'LoRA'} | {len(self.examples)} "
                  f"examples ({self.order.batches_per_epoch} batches/epoch x {self.world} process(es)) | "
                  f"{self.max_steps} steps | {self.size[0]}x{self.size[1]} px | optimizer "
                  f"{self.optimizer_name}({self.optimizer_args}) | seed {setup.seed} | model {setup.model_path} | "
                  f"output {setup.output_dir}", flush=True)
        if setup.prompts and (args.sample_at_first or setup.quick_start) and self.start_step == 0:
            self._sample("before", 0)
        progress = tqdm(total=self.max_steps, initial=self.start_step, desc="steps", disable=not self.main,
                        dynamic_ncols=True, file=sys.stdout)
        display_every = 1 if self.accelerator.device.type == "cpu" else 10  # .item() syncs an accelerator
        pending: list[torch.Tensor] = []
        batches = iter(self.loader)
        done = self.start_step
        with GracefulStop() as stop:
            for step in range(self.start_step, self.max_steps):
                if self._stop_requested(stop, step, display_every):
                    break
                self._train_step(step, batches, pending, progress, display_every)
                done = step + 1
            progress.close()
            if stop.signum is not None and done < self.max_steps:
                self._stop_early(done, pending, stop.signum)
            self._check_ranks_in_sync()
            self._finish()
        if stop.signum is not None and self.main:
            print("(the stop came after the last step: the run's outputs are complete)", flush=True)

    def _train_step(self, step: int, batches, pending: list[torch.Tensor], progress, display_every: int) -> None:
        args = self.args
        for a in range(self.accum):
            pending.append(self._micro_batch(next(batches), sync=a == self.accum - 1))
        if args.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % display_every == 0 or done == self.max_steps:
            self._record(done, pending, progress)
        progress.update(1)
        if done < self.max_steps:
            self._periodic(done)

    def _stop_requested(self, stop: "GracefulStop", step: int, every: int) -> bool:
        """Whether to stop before this step. With several processes they decide together (a max over the
        ranks, every `every` steps: a process that stopped alone would leave the others waiting)."""
        if step == self.start_step:
            return False
        if self.world == 1:
            return stop.signum is not None
        if step % every:
            return False
        flag = torch.tensor([stop.signum or 0], device=self.accelerator.device)
        agreed = int(self.accelerator.reduce(flag, reduction="max").item())
        if agreed and stop.signum is None:
            stop.signum = agreed
        return bool(agreed)

    def _stop_early(self, done: int, pending: list[torch.Tensor], signum: int) -> None:
        """After a Ctrl-C / SIGTERM: the model and a state at the step reached, and the command that continues."""
        if pending:
            self._record(done, pending, _NoProgress())
        stem = self.setup.output_dir / f"{self.setup.output_name}-step{done:08d}"
        if self.main:
            self._save(stem, done, self._epoch(done)[0], with_state=True)
        self.accelerator.wait_for_everyone()
        if self.main:
            state = stem.with_name(stem.name + "-state")
            launcher = "" if self.world == 1 else f" (through the same launcher, {self.world} processes)"
            print(f"stopped at step {done} of {self.max_steps}; continue with{launcher}: "
                  f"{resume_command(state)}", flush=True)
        raise Interrupted(signum)

    # --- outputs

    def _epoch(self, done: int) -> tuple[int, bool]:
        """(epoch number the step ends in, whether it is the epoch's last step)."""
        steps_per_epoch = math.ceil(self.order.batches_per_epoch / self.accum)
        return math.ceil(done / steps_per_epoch), done % steps_per_epoch == 0

    def metadata(self, steps: int, epoch: int) -> dict[str, str]:
        return training_metadata(self.setup, self.model, self.optimizer_name, self.optimizer_args, steps, epoch,
                             len(self.examples), self.order.batches_per_epoch, self.max_steps, self.started)

    def _save(self, stem: Path, steps: int, epoch: int, with_state: bool) -> None:
        try:
            saved = self.model.save_model(self.setup, stem, self.metadata(steps, epoch))
        except OSError as e:  # disk full, folder gone: one line, the previous file stays in place
            raise checkpoint.write_error(stem, e) from None
        print(f"\nsaved {saved}", flush=True)
        if with_state:
            train_state = {"current_step": steps, "current_epoch": epoch, "seed": self.setup.seed,
                           "losses": self.losses, "lrs": self.lr_history, "full_finetune": self.setup.full_finetune,
                           "train_data_dir": os.path.abspath(self.setup.train_data_dir),
                           "embedded_dataset": self.setup.args.train_data_dir is None}
            path = stem.with_name(stem.name + "-state")
            try:
                checkpoint.save_state(path, self.model.state_weights(), self.optimizer, self.lr_scheduler,
                                      train_state)
            except OSError as e:
                raise checkpoint.write_error(path, e) from None
            print(f"saved state {path}", flush=True)

    def _sample(self, column: str, step: int) -> None:
        if self.main:
            images = self.columns[column] = self.model.sample(self.setup, self.size)
            for i, image in enumerate(images):
                name = f"{self.setup.output_name}_{step:06d}_{i:02d}.png"
                sampling.save_png(image, self.setup.output_dir / "sample" / name)
        self.accelerator.wait_for_everyone()

    def _periodic(self, done: int) -> None:
        """kohya's intermediate saves (-stepNNNNNNNN / -NNNNNN names) and samples."""
        args, setup = self.args, self.setup
        epoch, epoch_end = self._epoch(done)
        by_steps = bool(args.save_every_n_steps and done % args.save_every_n_steps == 0)
        by_epochs = bool(args.save_every_n_epochs and epoch_end and epoch % args.save_every_n_epochs == 0)
        if by_steps or by_epochs:
            if self.main:
                for on, suffix in ((by_steps, f"-step{done:08d}"), (by_epochs, f"-{epoch:06d}")):
                    if on:
                        self._save(setup.output_dir / f"{setup.output_name}{suffix}", done, epoch, args.save_state)
            self.accelerator.wait_for_everyone()
        if setup.prompts and ((args.sample_every_n_steps and done % args.sample_every_n_steps == 0)
                              or (args.sample_every_n_epochs and epoch_end and epoch % args.sample_every_n_epochs == 0)):
            self._sample(f"step {done}", done)

    def _draw_lr_mask(self, step: int) -> Path:
        """<output_name>_lr_mask.png: the learned Automagic mask per layer, and the schedule's factor apart."""
        from ..lr_mask_view import draw, layers_from_state, match_names, shapes_in_state

        state = self.raw_optimizer.state_dict()
        names = match_names({k: tuple(v.shape) for k, v in self.model.state_weights().items()},
                            shapes_in_state(state))
        title = (f"{self.setup.output_name}: learned lr mask per layer at step {step} "
                 f"({'full fine-tune' if self.setup.full_finetune else 'LoRA'})")
        return draw(layers_from_state(state, names), self.setup.output_dir / f"{self.setup.output_name}_lr_mask.png",
                    title, self.group_names)

    def _check_ranks_in_sync(self) -> None:
        """Every process must end with the same weights (DDP averages gradients; a bug here would be silent)."""
        if self.world == 1:
            return
        digest = weights_digest(self.trainable)
        value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=self.accelerator.device)
        gathered = self.accelerator.gather(value).tolist()
        if len(set(gathered)) != 1:
            raise RuntimeError(f"trained weights differ between processes: {gathered}")
        if self.main:
            print(f"weights identical on all {self.world} processes (sha256 {digest[:16]})", flush=True)

    def _finish(self) -> None:
        """The model (+ state), the loss curve, the last samples and the grid."""
        setup, args = self.setup, self.args
        if self.main:
            epoch, _ = self._epoch(self.max_steps)
            self._save(setup.output_dir / setup.output_name, self.max_steps, epoch,
                       args.save_state or args.save_state_on_train_end)
            if self.losses:
                title = f"{'full fine-tune' if setup.full_finetune else 'LoRA'} | {self.optimizer_name}"
                curve = sampling.save_loss_curve(setup.output_dir / f"{setup.output_name}_loss.png", self.losses,
                                                 self.lr_history, title)
                print(f"saved {curve}", flush=True)
            if hasattr(self.raw_optimizer, "effective_lrs"):
                print(f"saved {self._draw_lr_mask(self.max_steps)}", flush=True)
        if setup.prompts:
            self._sample("after" if self.columns else f"step {self.max_steps}", self.max_steps)
            if self.main:
                grid = sampling.make_grid(self.columns, [p.prompt for p in setup.prompts])
                path = sampling.save_png(grid, setup.output_dir / "sample" / f"{setup.output_name}_grid.png")
                print(f"saved {path}", flush=True)
        self.accelerator.wait_for_everyone()
        if args.logging_dir:
            self.accelerator.end_training()


class Interrupted(Exception):
    """The run stopped on a signal after saving; main() turns it into exit status 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class GracefulStop:
    """Ctrl-C / SIGTERM during the loop: the first one is remembered (the loop finishes its step, saves a
    state and says how to continue), a second one ends the process at once, without saving."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: stopping now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)  # at once: no cleanup that could hang; a half save is cleaned by the next run
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a state to resume from "
              "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)


class _NoProgress:
    def set_postfix(self, *args, **kwargs) -> None:
        pass


def resume_command(state: Path) -> str:
    """The command line this process was started with, its --resume (if any) replaced by `state`."""
    argv, kept, skip = sys.argv, [], False
    for token in argv[1:]:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    program = argv[0] if argv else "train_network_patch.py"
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and program.endswith(".py"):  # started as python -m NAME
        head = ["python", "-m", spec.name[:-len(".__main__")] if spec.name.endswith(".__main__") else spec.name]
    elif program.endswith(".py"):
        head = ["python", program]
    else:  # a console script, e.g. automagic-sinkgd-train
        head = [os.path.basename(program) or "python"]
    return shlex.join(head + kept + ["--resume", str(state)])


def warmup_outlasts_run(optimizer, steps: int) -> str | None:
    """One line when Automagic_Sinkgd's warm-up is not shorter than the run: its mask would adapt to the
    end and never settle or decay (e.g. warmup_steps=800 on a short run)."""
    if not hasattr(optimizer, "effective_lrs") or "warmup_steps" not in optimizer.param_groups[0]:
        return None
    from ..automagic_sinkgd import _planned_warmup

    group = max(optimizer.param_groups, key=_planned_warmup)
    warmup = _planned_warmup(group)
    if warmup < steps:
        return None
    return (f"warmup_steps={group['warmup_steps']} is not shorter than this run ({steps} steps): the mask adapts "
            f"to the end and never settles or decays; pass --optimizer_args warmup_steps=N with N < {steps} "
            "(warmup_steps=0.25: a quarter of the run)")


def _remove_if_empty(folder: Path) -> None:
    """The output folder a failed run created, when nothing was written to it."""
    try:
        if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
            shutil.rmtree(folder)
    except OSError:
        pass


def train(setup: Setup) -> int:
    created = not setup.output_dir.exists()
    try:
        Run(setup).train()
    except BaseException:
        if created:
            _remove_if_empty(setup.output_dir)
        raise
    return 0


def _cache_latents(model: Model, dataset: ImageDataset, seed: int) -> dict:
    """VAE latents of every distinct (image, flip) once; each its own seeded draw, identical on every process."""
    cache, seen = {}, {}
    flips = (False, True) if model.args.flip_aug else (False,)
    for index, example in enumerate(dataset.examples):
        for flip in flips:
            key = (example.image, flip)
            if key not in seen:
                pixels = dataset[(index, flip, 0)]["pixels"].unsqueeze(0)
                seen[key] = model.encode_images(pixels, [example_generator(seed, -1 - len(seen))])[0].cpu()
            cache[(index, flip)] = seen[key]
    return cache


# ----------------------------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None, script: str = "train_network") -> int:
    """Parse kohya-style arguments and train; returns the exit code (2 for a usage/data error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = cli.parse_args(argv)
        setup = resolve(args, script)
        return train(setup)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as stop:
        return 128 + stop.signum
    except KeyboardInterrupt:  # before the loop (loading, first samples) or while writing the final outputs
        print("\ninterrupted: stopped before a state could be saved (nothing to resume from this run)",
              file=sys.stderr, flush=True)
        return 130
    except SystemExit as e:  # --help printed the usage
        if e.code in (0, None):
            return 0
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Rebuild the embedded default model (library/builtin/assets/default_model) from scratch.

    python tools/build_default_model.py                # full build, seed 0, 1 thread (~30-60 min on a CPU)
    python tools/build_default_model.py --verify-out DIR   # also train a quick LoRA and write before/after grids

Stages, all on CPU, seeded:
  1. VAE (AutoencoderKL, 32x32x3 <-> 8x8x4) on procedural shapes, the star included
     (a VAE is a generic image codec: SD's own VAE has seen every kind of image).
  1b. Decoder-only refinement (encoder frozen, so the latent space, and with it
     stage 3, does not depend on this stage): crisper decoded images.
  2. Latent scale: scaling_factor = 1 / std of the encoded training latents.
  3. U-Net + CLIP text encoder, epsilon prediction on "a <colour> <shape> on <background>"
     captions, 10% empty captions (classifier-free guidance). The word "sks" and
     the star shape never appear here: they are what the default LoRA learns.
  4. Save in diffusers layout, weights in float16 (a few MB); ensure_default_model()
     upcasts them to float32 when it assembles the cache folder.
  5. (--verify-out) a LoRA on the U-Net attention projections, trained on the
     default dataset, and sample grids before / after it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from library.builtin import default_model as dm  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the range SD's VAE uses."""
    a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_pil(x: torch.Tensor):
    from PIL import Image
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def write_tokenizer(folder: Path):
    """vocab.json + merges.txt (readable by any transformers version) + tokenizer.json/config."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = dm.build_bpe_vocab(dm.vocabulary_words())
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77)
    tok.save_pretrained(str(folder))
    # save_pretrained rewrites the folder's tokenizer files; keep the classic pair too.
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------------------
# Stage 1: VAE
# ---------------------------------------------------------------------------

def train_vae(steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL(**dm.vae_config())
    n_imgs = 6000
    data = torch.stack([to_tensor(dm.random_vae_example(rng)) for _ in range(n_imgs)])
    # The base pretraining images, so the VAE is best where the U-Net works.
    base = torch.stack([to_tensor(dm.random_base_example(rng)[0]) for _ in range(2000)])
    data = torch.cat([data, base])
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} rec {rec_loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return vae


def refine_decoder(vae, steps: int, batch: int, seed: int):
    """Stage 1b: sharpen the decoder with the encoder frozen.

    The latent space (encoder) stays exactly as stage 1 left it, so this stage
    is independent of the U-Net stage; it only makes decoded images crisper.
    """
    if steps <= 0:
        return vae
    torch.manual_seed(seed + 10)
    rng = random.Random(seed + 10)
    imgs = [dm.random_vae_example(rng) for _ in range(4000)] + [dm.random_base_example(rng)[0] for _ in range(2000)]
    imgs += [dm.concept_example(100 + i) for i in range(200)]
    data = torch.stack([to_tensor(i) for i in imgs])
    vae.requires_grad_(False)
    with torch.no_grad():
        moments = torch.cat([vae.quant_conv(vae.encoder(data[i:i + 256])) for i in range(0, len(data), 256)])
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 11)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        rec = vae.decode(z).sample
        x = data[idx]
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"decoder step {step} rec {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.requires_grad_(False)
    vae.eval()
    return vae


# ---------------------------------------------------------------------------
# Stage 3: U-Net + text encoder
# ---------------------------------------------------------------------------

def encode_ids(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def train_unet(vae, tok, steps: int, batch: int, seed: int, n_images: int, init_from: Path | None = None,
               max_lr: float = 1e-3):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 1)
    rng = random.Random(seed + 1)
    pairs = [dm.random_base_example(rng) for _ in range(n_images)]
    imgs = torch.stack([to_tensor(p[0]) for p in pairs])
    captions = [p[1] for p in pairs]
    with torch.no_grad():
        moments = torch.cat([vae.encode(imgs[i:i + 256]).latent_dist.parameters for i in range(0, n_images, 256)])
    mean, logvar = moments.chunk(2, dim=1)
    std_lat = torch.exp(0.5 * logvar.clamp(-30, 20))
    # Round 2 keeps the latent scale the U-Net was trained with.
    scale = float(vae.config.scaling_factor) if init_from else 1.0 / float(mean.std())
    log(f"latent std {mean.std():.4f} -> scaling_factor {scale:.4f}; posterior std mean {std_lat.mean():.4f}")
    vae.register_to_config(scaling_factor=scale)

    ids_all = encode_ids(tok, captions)
    empty_ids = encode_ids(tok, [""])
    if init_from:  # continue a previous build (a second, lower-lr round on fresh images)
        te = CLIPTextModel.from_pretrained(str(init_from / "text_encoder"), dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(str(init_from / "unet"), torch_dtype=torch.float32)
        log(f"U-Net and text encoder continued from {init_from}")
    else:
        te = CLIPTextModel(CLIPTextConfig(**dm.text_encoder_config(len(tok), tok.bos_token_id, tok.eos_token_id)))
        unet = UNet2DConditionModel(**dm.unet_config(te.config.hidden_size))
    te.train()
    unet.train()
    noise_sched = DDPMScheduler.from_config(dm.scheduler_config())
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=max_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=0.05)
    alphas = noise_sched.alphas_cumprod
    g = torch.Generator().manual_seed(seed + 2)
    t0 = time.time()
    ema = None
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch,), generator=g)
        z = (mean[idx] + std_lat[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        ids = ids_all[idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        ids[drop] = empty_ids
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = te(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step} loss(ema) {ema:.4f} ({time.time() - t0:.0f}s)")
    unet.eval()
    te.eval()
    return unet, te


# ---------------------------------------------------------------------------
# Stage 4: save
# ---------------------------------------------------------------------------

def save_assets(out: Path, unet, vae, te, tok_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**dm.scheduler_config()),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for config in tmp.glob("*/config.json"):  # the folder the parts were loaded from is the builder's own
        text = config.read_text()
        config.write_text(re.sub(r'("_name_or_path": )"[^"]*"', r'\1""', text))
    shutil.rmtree(tmp / "tokenizer")
    shutil.copytree(tok_dir, tmp / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"assets written to {out} ({total / 1e6:.2f} MB)")


# ---------------------------------------------------------------------------
# Stage 5: verification LoRA and sample grids
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(pipe, prompts, seeds, path: Path, label: str) -> None:
    """Rows = prompts, columns = seeds; upscaled 4x (nearest) so 32 px images are visible."""
    from PIL import Image, ImageDraw
    size = dm.DEFAULT_RESOLUTION
    cell = size * 4
    grid = Image.new("RGB", (cell * len(seeds) + 170, cell * len(prompts) + 20), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    d.text((4, 4), label, fill=(0, 0, 0))
    for r, p in enumerate(prompts):
        d.text((4, 20 + r * cell + cell // 2), p, fill=(0, 0, 0))
        for c, s in enumerate(seeds):
            img = pipe(p, height=size, width=size, num_inference_steps=dm.SAMPLE_STEPS,
                       guidance_scale=dm.SAMPLE_GUIDANCE, generator=torch.Generator().manual_seed(s)).images[0]
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (170 + c * cell, 20 + r * cell))
    grid.save(path)
    log(f"grid {path}")


class LoRALinear(torch.nn.Module):
    """W x + (alpha/r) B A x, B = 0 at start (the usual LoRA, enough to check learnability)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4, alpha: float = 4.0):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def inject_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """Wrap the Linear layers of every attention block (kohya's default LoRA targets)."""
    params = []
    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    for name, mod in list(unet.named_modules()):
        if "attentions" in name and name.endswith(targets) and isinstance(mod, torch.nn.Linear):
            parent_name, _, child = name.rpartition(".")
            lora = LoRALinear(mod, rank)
            setattr(unet.get_submodule(parent_name), child, lora)
            params += [lora.down.weight, lora.up.weight]
    return params


def verify(model_dir: str, out: Path, steps: int, seed: int) -> None:
    from diffusers import StableDiffusionPipeline

    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seeds = [0, 1, 2, 3]
    t0 = time.time()
    sample_grid(pipe, dm.SAMPLE_PROMPTS, seeds, out / "before.png", "before LoRA")
    log(f"sampling {len(dm.SAMPLE_PROMPTS) * len(seeds)} images took {time.time() - t0:.1f}s")
    data_root = Path(dm.ensure_default_dataset(str(out / "dataset")))
    files = sorted((data_root / dm.DATASET_SUBFOLDER).glob("*.png"))
    from PIL import Image
    imgs = torch.stack([to_tensor(Image.open(f).convert("RGB")) for f in files])
    vae, unet, te, tok = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        lat = vae.encode(imgs).latent_dist
        cond = te(encode_ids(tok, [dm.CONCEPT_CAPTION]))[0]
    unet.requires_grad_(False)
    params = inject_lora(unet, rank=4)
    log(f"LoRA params: {sum(p.numel() for p in params)}")
    opt = torch.optim.AdamW(params, lr=3e-3)
    alphas = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        b = 8
        idx = torch.randint(0, len(files), (b,), generator=g)
        z = (lat.mean[idx] + lat.std[idx] * torch.randn(lat.mean[idx].shape, generator=g)) * vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond.expand(b, -1, -1)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"lora step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    unet.eval()
    sample_grid(pipe, dm.SAMPLE_PROMPTS, seeds, out / "after.png", f"after LoRA ({steps} AdamW steps)")


def train_unet_round2(vae, tok, unet, te, args):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(str(Path(d) / "unet"))
        te.save_pretrained(str(Path(d) / "text_encoder"))
        return train_unet(vae, tok, args.unet_round2_steps, args.batch, args.seed + 100, args.unet_images,
                          init_from=Path(d), max_lr=5e-4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--unet-steps", type=int, default=1500)
    ap.add_argument("--unet-images", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32, help="U-Net batch size")
    ap.add_argument("--vae-batch", type=int, default=24)
    ap.add_argument("--decoder-steps", type=int, default=1500, help="stage 1b: decoder-only refinement")
    ap.add_argument("--refine-only", type=Path, default=None,
                    help="run only stage 1b on this stage-1 VAE folder, save to <work-dir>/vae_stage1b")
    ap.add_argument("--out", type=Path, default=dm.ASSETS_DIR)
    ap.add_argument("--verify-out", type=Path, default=None, help="also run the LoRA check, write grids here")
    ap.add_argument("--verify-only", action="store_true", help="skip the build; check the current assets")
    ap.add_argument("--work-dir", type=Path, default=REPO / "build" / "default_model_work",
                    help="intermediate files (tokenizer, stage-1 VAE); not shipped")
    ap.add_argument("--unet-round2-steps", type=int, default=1200, help="second U-Net round on new images, lr 5e-4")
    ap.add_argument("--unet-init", type=Path, default=None,
                    help="assets folder whose U-Net/text encoder start round 2 (skips stages 1-3 training)")
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse a stage-1 VAE folder (skips stage 1)")
    ap.add_argument("--lora-steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    if args.refine_only:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(str(args.refine_only), torch_dtype=torch.float32)
        refine_decoder(vae, args.decoder_steps, args.vae_batch, args.seed).save_pretrained(
            str(args.work_dir / "vae_stage1b"))
        log(f"decoder refinement wall time {time.time() - t_start:.0f}s")
        return 0
    if args.unet_init and not args.verify_only:
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer
        init = args.unet_init
        vae = AutoencoderKL.from_pretrained(str(init / "vae"), torch_dtype=torch.float32).eval()
        tok = CLIPTokenizer.from_pretrained(str(init / "tokenizer"), local_files_only=True)
        unet, te = train_unet(vae, tok, args.unet_round2_steps, args.batch, args.seed + 100, args.unet_images,
                              init_from=init, max_lr=5e-4)
        tok_copy = args.work_dir / "tokenizer_round2"
        shutil.rmtree(tok_copy, ignore_errors=True)
        shutil.copytree(init / "tokenizer", tok_copy)
        save_assets(args.out, unet, vae, te, tok_copy)
        log(f"round-2 wall time {time.time() - t_start:.0f}s on {args.threads} thread(s)")
    elif not args.verify_only:
        tok = write_tokenizer(args.work_dir / "tokenizer")
        if args.vae_from:
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(str(args.vae_from), torch_dtype=torch.float32).eval()
            log(f"VAE loaded from {args.vae_from}")
        else:
            vae = train_vae(args.vae_steps, args.vae_batch, args.seed)
            vae.save_pretrained(str(args.work_dir / "vae_stage1"))  # lets a U-Net rerun skip stage 1
            vae = refine_decoder(vae, args.decoder_steps, args.vae_batch, args.seed)
            vae.save_pretrained(str(args.work_dir / "vae_stage1b"))
        unet, te = train_unet(vae, tok, args.unet_steps, args.batch, args.seed, args.unet_images)
        if args.unet_round2_steps > 0:  # second round: fresh images (another seed), lower peak lr
            unet, te = train_unet_round2(vae, tok, unet, te, args)
        save_assets(args.out, unet, vae, te, args.work_dir / "tokenizer")
        shutil.rmtree(args.work_dir / "tokenizer", ignore_errors=True)
        log(f"build wall time {time.time() - t_start:.0f}s on {args.threads} thread(s)")
    if args.verify_out:
        verify(str(args.out), args.verify_out, args.lora_steps, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

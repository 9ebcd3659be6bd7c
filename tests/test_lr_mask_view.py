"""The mask picture: effective lr per layer from a live optimizer or a saved state, the picture
at the end of a built-in run, the TensorBoard histograms, and the tools/ command."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.automagic_sinkgd import Automagic_Sinkgd
from library.lr_mask_view import (
    LayerRates,
    effective_rates,
    in_forward_order,
    layer_of,
    layers_from_state,
    match_names,
    summary,
)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.mark.parametrize("name, layer", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
     "unet down_blocks.0.attentions.0"),
    ("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight", "unet mid_block"),
    ("lora_unet_up_blocks_1_resnets_2_conv1.alpha", "unet up_blocks.1.resnets.2"),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight", "te layer 11"),
    ("lora_te2_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight", "te2 layer 3"),
    ("unet.down_blocks.1.resnets.0.conv1.weight", "unet down_blocks.1.resnets.0"),
    ("unet.conv_in.weight", "unet conv_in"),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.bias", "te layer 0"),
])
def test_layer_names(name, layer):
    assert layer_of(name) == layer


def test_names_are_matched_by_shape_or_not_at_all():
    names = {"up_blocks.0.w": (4, 2), "mid_block.w": (4, 2), "down_blocks.0.w": (2, 3), "down_blocks.0.alpha": ()}
    # kohya's order: down, up, then mid (diffusers registers mid_block after up_blocks)
    assert match_names(names, [(2, 3), (4, 2), (4, 2)]) == ["down_blocks.0.w", "up_blocks.0.w", "mid_block.w"]
    assert match_names(names, [(2, 3), (2, 3), (4, 2)]) is None  # shapes do not fit: labels by index instead
    assert match_names(names, [(2, 3), (4, 2)]) is None


def test_layers_are_drawn_in_forward_order():
    labels = ["unet conv_in", "unet down_blocks.0.attentions.0", "unet up_blocks.0.resnets.0", "unet mid_block",
              "unet conv_out", "te layer 0"]
    layers = [LayerRates(n, 0 if n.startswith("te") else 1, torch.ones(1), 1) for n in labels]
    assert [layer.name for layer in in_forward_order(layers)] == [
        "te layer 0", "unet conv_in", "unet down_blocks.0.attentions.0", "unet mid_block",
        "unet up_blocks.0.resnets.0", "unet conv_out"]


def test_rates_average_to_the_optimizers_effective_lr():
    """After warm-up with a frozen mask, the element mean of the per-element rates is the
    optimizer's own element-weighted effective lr (mask x ALLoRA x VRAdam x decay)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 12) * 0.1), torch.nn.Parameter(torch.zeros(12, 8)),
              torch.nn.Parameter(torch.randn(12) * 0.1)]
    opt = Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=4)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    state = opt.state_dict()
    rates = [effective_rates(state["state"][i], state["param_groups"][0]) for i in range(3)]
    total = sum(r.sum() for r in rates) / sum(r.numel() for r in rates)
    assert total.item() == pytest.approx(opt.effective_lrs()[0].item(), rel=1e-5)
    rows = summary(layers_from_state(state))
    assert len(rows) == 3 and all(r["p05"] <= r["median"] <= r["p95"] for r in rows)


def test_builtin_run_draws_the_mask_logs_histograms_and_the_tool_reads_its_state(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from builtin_fixtures import base_args, build_dataset, build_tiny_pipeline
    from library.builtin.trainer import main
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data = build_tiny_pipeline(tmp_path / "model"), build_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = base_args(model, data, out, 10) + ["--optimizer_type", "automagic_sinkgd", "--save_state",
                                              "--logging_dir", str(tmp_path / "logs"),
                                              "--optimizer_args", "warmup_steps=6", "lr_bump=1e-4"]
    assert main(argv) == 0
    assert (out / "tiny_lr_mask.png").stat().st_size > 0
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"histograms": 0})
    acc.Reload()
    assert {"lr_mask/unet", "lr_mask/textencoder"} <= set(acc.Tags()["histograms"])
    assert [e.step for e in acc.Histograms("lr_mask/unet")] == [10]

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "lr_mask_picture.py"), str(out / "tiny-state"),
                           "--table"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "note:" not in done.stderr  # names found in the state's weights file
    assert "unet down_blocks.0.attentions.0" in done.stdout and "te layer 0" in done.stdout
    assert (out / "tiny-state_lr_mask.png").stat().st_size > 0


def test_the_tool_refuses_a_state_without_a_mask(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()
    (tmp_path / "s").mkdir()
    torch.save(opt.state_dict(), tmp_path / "s" / "optimizer.bin")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "lr_mask_picture.py"), str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not an Automagic_Sinkgd state" in done.stderr


def _lora_preset_run(steps: int, total: int):
    """Automagic_Sinkgd with the shipped `lora` preset's settings (decay_floor=0: the run decays to 0)."""
    from library.optimizer_factory import build_optimizer
    from library.presets import load_preset

    preset = load_preset("lora")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 10) * 0.1), torch.nn.Parameter(torch.zeros(10, 6)),
              torch.nn.Parameter(torch.randn(10) * 0.1)]
    _, _, opt = build_optimizer(preset["optimizer_type"], [{"params": params, "lr": preset["learning_rate"]}],
                                preset["learning_rate"], preset["optimizer_args"], run_length=total,
                                lora_scale=1.0)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()
    return opt


def test_the_mask_stays_visible_when_the_lora_preset_has_decayed_to_zero(tmp_path):
    """Once a `lora`-preset run has decayed to 0 (decay_floor=0) the view still shows the learned mask,
    and the schedule's factor apart (0), in the table and in the picture's top panel. (The run goes on
    past its planned length: a tensor whose mask ended warm-up below its peak decays more slowly, the
    document's rule, and may keep a small rate at the last planned step.)"""
    from PIL import Image

    from library.lr_mask_view import draw, table

    assert load_lora_floor() == 0.0
    total = 20
    opt = _lora_preset_run(2 * total, total)
    state = opt.state_dict()
    assert all(v.item() == 0.0 for v in opt.effective_lrs())  # the schedule is at 0 ...
    layers = layers_from_state(state)
    rows = summary(layers)
    assert all(r["median"] >= 1e-6 and r["min"] > 0 for r in rows)  # ... the mask is not: >= min_lr
    assert all(r["factor_min"] == r["factor_max"] == 0.0 and r["effective_median"] == 0.0 for r in rows)
    text = table(layers)
    assert " 0 " in text.splitlines()[1] + " " and "e-05" in text  # decay 0, mask medians ~1e-5..5e-5

    path = draw(layers, tmp_path / "mask.png", "decayed to 0")
    pixels = Image.open(path).convert("RGB")
    top = pixels.crop((0, 0, pixels.width, int(pixels.height * 0.6)))
    blue = sum(1 for r, g, b in top.getdata() if b > 150 and r < 100 and 90 < g < 150)  # matplotlib's C0
    assert blue > 30, "the mask panel is empty"

    # half-way through the decay the factor is between 0 and 1 and the effective lr is mask x factor
    from library.automagic_sinkgd import warmup_length
    from library.optimizer_factory import parse_optimizer_args
    from library.presets import load_preset

    warmup = warmup_length(parse_optimizer_args(load_preset("lora")["optimizer_args"])["warmup_steps"], total)
    mid = _lora_preset_run(warmup + (total - warmup) // 2, total).state_dict()
    rows = summary(layers_from_state(mid))
    assert all(0.0 < r["factor_min"] < 1.0 for r in rows)


def load_lora_floor() -> float:
    from library.optimizer_factory import parse_optimizer_args
    from library.presets import load_preset

    return parse_optimizer_args(load_preset("lora")["optimizer_args"])["decay_floor"]


def test_the_bf16_state_mask_is_decoded():
    """The bf16 state keeps the mask as 16-bit lattice codes: the view shows lrs, not the codes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 10) * 0.1)]
    opt = Automagic_Sinkgd(params, lr=1e-4, min_lr=1e-6, max_lr=1e-3, warmup_steps=4, state_precision="bf16")
    for _ in range(3):
        params[0].grad = torch.randn_like(params[0]) * 1e-2
        opt.step()
    state = opt.state_dict()
    assert state["state"][0]["lr_mask"].dtype == torch.uint16
    row = summary(layers_from_state(state))[0]
    assert 1e-6 <= row["min"] <= row["median"] <= row["max"] <= 1e-3
    from library.lr_mask_view import mask_histograms

    logged = mask_histograms(opt)[0]  # the TensorBoard histogram of the group
    assert 1e-6 <= logged.min().item() <= logged.max().item() <= 1e-3

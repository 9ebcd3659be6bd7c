"""The built-in backend's LoRA file is accepted by kohya's own loader (networks.lora).

Needs sd-scripts and its Python environment: SD_SCRIPTS_DIR (the sd-scripts folder) and KOHYA_VENV (a venv
with sd-scripts' requirements). Skipped when either is absent, as in CI.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from builtin_fixtures import base_args, build_dataset, build_tiny_pipeline
from library.builtin.trainer import main

SD_SCRIPTS = os.environ.get("SD_SCRIPTS_DIR")
KOHYA_VENV = os.environ.get("KOHYA_VENV")

pytestmark = pytest.mark.skipif(
    not (SD_SCRIPTS and KOHYA_VENV and Path(SD_SCRIPTS, "networks", "lora.py").is_file()
         and Path(KOHYA_VENV, "bin", "python").is_file()),
    reason="needs SD_SCRIPTS_DIR (kohya-ss sd-scripts) and KOHYA_VENV (its Python environment)",
)

# Run inside kohya's environment: build kohya's LoRANetwork from our file on the same model, load the
# weights strictly (every key must find its module, with the same shapes), apply it, and report.
KOHYA_SCRIPT = r"""
import json, sys
import torch
from diffusers import StableDiffusionPipeline
from networks import lora as kohya_lora

model_dir, lora_file = sys.argv[1], sys.argv[2]
# tokenizer=None as kohya loads it (and a tokenizer saved by a newer transformers may not load there)
pipe = StableDiffusionPipeline.from_pretrained(model_dir, tokenizer=None, safety_checker=None,
                                               requires_safety_checker=False)
network, weights = kohya_lora.create_network_from_weights(1.0, lora_file, pipe.vae, pipe.text_encoder, pipe.unet,
                                                          for_inference=True)
network.apply_to(pipe.text_encoder, pipe.unet, True, True)
result = network.load_state_dict(weights, strict=True)
print("KOHYA_RESULT " + json.dumps({"unet": len(network.unet_loras), "te": len(network.text_encoder_loras),
                                    "keys": len(weights), "missing": list(result.missing_keys)}))
"""


def test_kohya_loader_accepts_our_lora(tmp_path):
    torch.set_num_threads(1)
    model = build_tiny_pipeline(tmp_path / "model")
    data = build_dataset(tmp_path / "data")
    assert main(base_args(model, data, tmp_path / "out", 2)) == 0
    env = dict(os.environ, PYTHONPATH=SD_SCRIPTS, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([str(Path(KOHYA_VENV, "bin", "python")), "-c", KOHYA_SCRIPT, str(model),
                             str(tmp_path / "out" / "tiny.safetensors")], cwd=SD_SCRIPTS, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("KOHYA_RESULT "))
    report = json.loads(line.split(" ", 1)[1])
    assert report == {"unet": 48, "te": 12, "keys": 3 * 60, "missing": []}

"""Automagic_Sinkgd: an optimizer plugin for kohya-ss sd-scripts.

Installed, the plugin is the package ``automagic_sinkgd_plugin`` (the repository's ``library/``
folder under a name of its own, so it never shadows kohya's ``library`` package), the presets
ship inside it, and ``train_network_patch`` is a top-level module with a console script.
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
PACKAGE = "automagic_sinkgd_plugin"

setup(
    name="automagic-sinkgd",
    version="0.1.0",
    description="Automagic_Sinkgd optimizer and presets for kohya-ss sd-scripts, with a built-in diffusers trainer",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[PACKAGE, f"{PACKAGE}.builtin", f"{PACKAGE}.configs"],
    package_dir={PACKAGE: "library", f"{PACKAGE}.configs": "configs"},
    package_data={f"{PACKAGE}.configs": ["*.toml"], f"{PACKAGE}.builtin": ["assets/*", "assets/**/*"]},
    py_modules=["train_network_patch"],
    entry_points={"console_scripts": ["automagic-sinkgd-train=train_network_patch:main"]},
    install_requires=[
        "torch>=2.1",
        "accelerate>=0.30",
        "diffusers>=0.27",
        "transformers>=4.38",
        "safetensors>=0.4",
        "toml>=0.10",
        "matplotlib>=3.7",
        "tqdm",
    ],
    extras_require={
        "logging": ["tensorboard>=2.14"],
        "diffusers-lora": ["peft>=0.10"],
        "bench": ["prodigyopt>=1.0", "scikit-learn>=1.3"],
        # the opt-in fused step (fused=True); CUDA builds of torch on Linux already bring it
        "fused": ["triton>=3.0; platform_system == 'Linux'"],
        # peft: diffusers needs it to load a LoRA (load_lora_weights), which the tests check;
        # triton + numpy: the fused kernels' tests run in Triton's CPU interpreter (which needs numpy)
        "test": ["pytest>=7", "tensorboard>=2.14", "prodigyopt>=1.0", "scikit-learn>=1.3", "peft>=0.10",
                 "triton>=3.0; platform_system == 'Linux'", "numpy"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

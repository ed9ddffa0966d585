"""tide_ds: cross-architecture distillation of diffusion language models (TIDE) on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="tide_ds",
    version="0.1.0",
    description="TIDE distillation of diffusion LMs into block-diffusion students, on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tide_ds", "tide_ds.*"]),
    package_data={"tide_ds": ["recipes/*.yaml", "configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "mpi": ["mpi4py>=3.1"],
        "dev": ["pytest>=8.0", "hypothesis>=6.100", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["tide-ds=tide_ds.cli:main"]},
)

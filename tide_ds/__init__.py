"""tide_ds: TIDE cross-architecture distillation of diffusion LMs into block-diffusion students."""

__version__ = "0.1.0"

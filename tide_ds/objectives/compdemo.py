"""CompDemo: two teacher passes, each revealing a random half of the masked set to the other.

Pass 1 sees M_B masked and M_A revealed; pass 2 sees M_A masked and M_B revealed. Positions in
M_B take their teacher prediction from pass 1, positions in M_A from pass 2. Works on tokens
([b, l]) and on chunks ([b, C]) alike.
"""

from __future__ import annotations

import torch

from tide_ds.diffusion.noise import uniform


def comp_demo_split(masked: torch.Tensor, demo_ratio: float = 0.5, generator=None):
    """Splits the masked set: (m_a, m_b), each masked position in M_A with probability demo_ratio.
    `generator`: a torch.Generator or `tide_ds.diffusion.RowStreams`."""
    u = uniform(masked.shape, generator, masked.device)
    m_a = masked & (u < demo_ratio)
    return m_a, masked & ~m_a


def comp_demo_inputs(x_t: torch.Tensor, x0: torch.Tensor, m_a: torch.Tensor, m_b: torch.Tensor):
    """Teacher inputs for the two passes: pass 1 reveals M_A, pass 2 reveals M_B."""
    return torch.where(m_a, x0, x_t), torch.where(m_b, x0, x_t)


def comp_demo_merge(pass1: torch.Tensor, pass2: torch.Tensor, m_b: torch.Tensor) -> torch.Tensor:
    """Per position: pass 1's prediction where it was masked (M_B), else pass 2's.

    pass1 / pass2 have the mask's shape plus optional trailing dims (e.g. vocab)."""
    cond = m_b.reshape(m_b.shape + (1,) * (pass1.dim() - m_b.dim()))
    return torch.where(cond, pass1, pass2)

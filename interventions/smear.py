"""Smeared keys (Olsson et al. 2022, Argument 2).

For each head h a trainable scalar alpha_h; the key at position j becomes
``k'_j = sigmoid(alpha_h) * k_j + (1 - sigmoid(alpha_h)) * k_{j-1}``, and the first position's key
is left as it is. A one-layer model can then match "the token before this key" against the query:
an induction head in a single layer.

Initialisation:
  * training from scratch: alpha = 0 (sigmoid = 0.5, an even mix); gradient descent decides
    per head how much of the previous key to keep.
  * editing a trained model (``smear_keys(model)``): alpha = ``EDIT_INIT_ALPHA`` = 6
    (sigmoid = 0.9975), so the edited model first computes almost exactly what the original did
    and the alphas remain trainable (Adam rescales their small gradients).

Example:
    >>> smear = KeySmear(n_heads=2)
    >>> k = torch.randn(1, 2, 5, 8)  # (batch, head, pos, d_head)
    >>> smear(k).shape
    torch.Size([1, 2, 5, 8])
"""

from __future__ import annotations

import torch
from torch import nn

SCRATCH_INIT_ALPHA = 0.0
EDIT_INIT_ALPHA = 6.0


class KeySmear(nn.Module):
    """Mixes each key with the previous position's key, one learned weight per head."""

    def __init__(self, n_heads: int, init_alpha: float = SCRATCH_INIT_ALPHA):
        super().__init__()
        self.init_alpha = init_alpha
        self.alpha = nn.Parameter(torch.full((n_heads,), float(init_alpha)))  # (head,)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.init_alpha)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """k: (batch, head, pos, d_head) -> smeared keys of the same shape."""
        if k.shape[1] != self.alpha.shape[0]:
            raise ValueError(f"KeySmear has {self.alpha.shape[0]} heads but the keys have {k.shape[1]}")
        s = torch.sigmoid(self.alpha).to(k.dtype)[None, :, None, None]  # (1, head, 1, 1)
        prev = torch.cat([k[:, :, :1], k[:, :, :-1]], dim=2)  # k_{j-1}; position 0 uses itself
        return s * k + (1 - s) * prev

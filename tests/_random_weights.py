"""Every parameter of a module random (zero-inits, unit norms and a zero LoRA B would hide mapping bugs)."""
import math

import torch


@torch.no_grad()
def randomize_(module):
    """Fill every parameter with N(0, 1/fan_in) (fan_in = 4 for vectors); returns the module."""
    for p in module.parameters():
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 4))
    return module

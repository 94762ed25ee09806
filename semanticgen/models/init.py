"""Weight initialisation that can be re-run, e.g. after building a model on the meta device.

Every module with a non-default initialisation implements ``_init_special()`` (called at the end of its own
``__init__``); :func:`init_weights` resets the standard layers and then re-applies those, so
``model.to_empty(device=...)`` followed by ``init_weights(model)`` gives a model initialised exactly as a
freshly constructed one would be (same distributions; different draws unless the RNG state matches).
"""

from __future__ import annotations

import torch
from torch import nn

_STANDARD = (nn.Linear, nn.LayerNorm, nn.RMSNorm)


@torch.no_grad()
def init_weights(module: nn.Module) -> nn.Module:
    """(Re-)initialise every parameter under ``module`` in place; returns ``module``."""
    for m in module.modules():
        if isinstance(m, _STANDARD):
            m.reset_parameters()
    for m in module.modules():
        special = getattr(m, "_init_special", None)
        if special is not None:
            special()
    return module

"""Activation checkpointing, applied to a built model."""

from __future__ import annotations

import torch


def apply_ac(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Recompute each decoder layer in backward; trades ~33% more compute for activation memory.

    Non-reentrant checkpointing is used because it works with ZeRO-3's parameter hooks and with
    inputs that do not require grad.
    """
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model

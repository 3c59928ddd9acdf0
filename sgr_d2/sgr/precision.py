"""Mixed precision (AMP): the numerically sensitive parts of SGR run in float32 whatever autocast says.

Under ``torch.autocast`` a matrix product runs in float16 / bfloat16 even when its inputs are
float32, so casting to float32 is not enough: the autocast state must be switched off too.
``autocast_off(device)`` does that for the device's type (``cpu``, ``cuda``, ...); the callers
cast their inputs with ``.float()``. Outside autocast it changes nothing.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device) -> contextlib.AbstractContextManager:
    """A context in which autocast is disabled for ``device``'s type (a no-op context for a
    device type that has no autocast)."""
    device_type = torch.device(device).type
    is_available = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    if is_available is None and device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)

"""Triton backend (placeholder until the kernel lands)."""

from __future__ import annotations

import torch


def supports(q, spec, softcap) -> bool:
    return False


def check_available(q: torch.Tensor) -> None:
    raise RuntimeError("backend='triton': not implemented yet")


def triton_topk_attention(*args, **kwargs):
    raise RuntimeError("backend='triton': not implemented yet")

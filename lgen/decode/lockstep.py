"""Ranks that decode in lockstep (ZeRO-3, where every forward gathers weights from all ranks)."""

from __future__ import annotations

import torch


def all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank."""
    return all_max(int(flag), device) > 0


def idle_forward(model: torch.nn.Module, device: torch.device) -> None:
    """A forward that joins the other ranks' weight gathers without touching this rank's cache: one
    token, no cache, so it cannot run past the model's positions."""
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)

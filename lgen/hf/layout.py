"""How a run's processes share the model and the work, read once from the Lightning strategy and
handed to every part that depends on it (the module, the data plan, the stop on a signal), so that
each fact is decided in one place: :class:`Layout`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lgen.hf import tensor_parallel, zero3


@dataclass(frozen=True, kw_only=True)
class Layout:
    """``zero3``: DeepSpeed ZeRO-3 holds the weights in shards that every forward gathers;
    ``tensor``: the tensor-parallel degree (each rank of a group holds 1/``tensor`` of the heads);
    ``data``: the data-parallel places, each with rows and a shard of its own; ``world``: the
    processes; ``device``: their device type. The default is one process holding the whole model."""

    zero3: bool = False
    tensor: int = 1
    data: int = 1
    world: int = 1
    device: str = "cpu"

    @classmethod
    def of(cls, strategy: Any) -> Layout:
        """The layout ``strategy`` runs (known before its processes start)."""
        tensor, data = tensor_parallel.strategy_degrees(strategy)
        return cls(zero3=zero3.is_zero3(strategy), tensor=tensor, data=data,
                   world=int(getattr(strategy, "world_size", 1) or 1), device=strategy.root_device.type)

    @property
    def lockstep(self) -> bool:
        """Every forward runs on all ranks together (ZeRO-3 on several ranks): the ranks run as many
        batches and steps as each other, padding included."""
        return self.zero3 and self.world > 1

    @property
    def agreed_stop(self) -> bool:
        """Ranks must stop after the same batch: ranks in lockstep, and a tensor-parallel group
        (whose every forward is a collective too)."""
        return self.lockstep or self.tensor > 1

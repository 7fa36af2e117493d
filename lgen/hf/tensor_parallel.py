"""Tensor parallelism: a model's heads and MLP split over the GPUs of one group.

The distribution is Lightning's ``ModelParallelStrategy`` (process group and device mesh) and the
sharding is transformers' own: ``from_pretrained`` with ``DistributedConfig(tp_size=N)`` reads the
model's tensor-parallel plan (``base_model_tp_plan``: query, key, value and MLP input projections
split by columns, the attention and MLP outputs by rows, one all-reduce each) and loads each rank's
shard of every weight straight from the checkpoint, so the whole model never sits on one GPU.

transformers lays its mesh over every process of the run, so the tensor-parallel group is the whole
run: ``data_parallel_size`` must be 1 (:func:`check`). Every rank sees the same rows and computes
the same tokens (the all-reduced activations are bitwise equal on all ranks), so the ranks run the
same decode loop in step; rank 0 writes the records.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from lgen.errors import ConfigError


def strategy_degrees(strategy: Any) -> tuple[int, int]:
    """(tensor-parallel, data-parallel) sizes ``strategy`` asks for: (1, world) for any strategy but
    Lightning's ``ModelParallelStrategy``. Known before its processes start (``auto``: the devices of
    a node for the tensor-parallel size, the nodes for the data-parallel size, as Lightning resolves them)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return 1, int(getattr(strategy, "world_size", 1) or 1)
    tp, dp = strategy._tensor_parallel_size, strategy._data_parallel_size
    devices = len(strategy.parallel_devices or [None])
    tensor, data = (devices if tp == "auto" else int(tp)), (strategy.num_nodes if dp == "auto" else int(dp))
    if tensor * data != strategy.num_nodes * devices:
        raise ConfigError(f"trainer.strategy: tensor_parallel_size {tensor} x data_parallel_size {data} must be the "
                          f"number of processes, trainer.num_nodes x trainer.devices = {strategy.num_nodes * devices}; "
                          "e.g. on 2 nodes of 8 GPUs --trainer.strategy.init_args.tensor_parallel_size 16")
    return tensor, data


def check(model_config: Any, *, tensor: int, data: int, adapter: str | None, device: str) -> None:
    """Refuse, before any weights load, the settings a ``tensor``-way (above 1) run cannot work with.
    (DeepSpeed ZeRO-3 is another strategy, so the two cannot be asked for together.) ``device``:
    the type of the strategy's devices."""
    if data > 1:
        raise ConfigError(
            f"trainer.strategy: ModelParallelStrategy with data_parallel_size={data} and tensor_parallel_size="
            f"{tensor}: transformers shards a model over every process of the run, so lgen runs tensor parallelism "
            f"with data_parallel_size: 1 (one group of {tensor}); for more copies, run one lgen per group of GPUs, "
            "each on its own data.data_files, or use strategy: ddp when the model fits one GPU")
    if adapter is not None:
        raise ConfigError("model.adapter_name_or_path with tensor parallelism: peft adapters are not sharded; merge "
                          "the adapter into the model first (peft merge_and_unload, then save_pretrained) and give "
                          "that folder as model.model_name_or_path")
    cfg = model_config.get_text_config(decoder=True)
    plan = getattr(cfg, "base_model_tp_plan", None) or getattr(model_config, "base_model_tp_plan", None)
    if not plan:
        raise ConfigError(f"tensor_parallel_size={tensor}: the model type {model_config.model_type!r} has no "
                          "tensor-parallel plan in transformers (base_model_tp_plan); run it on one GPU, with "
                          "strategy: ddp, or with DeepSpeed ZeRO-3 (configs/zero3.yaml)")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for name, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % tensor:
            divisors = [d for d in range(1, count + 1) if heads % d == 0 and kv_heads % d == 0]
            raise ConfigError(f"tensor_parallel_size={tensor} does not divide the model's {count} {name}: each rank "
                              f"must hold whole heads; use one of {divisors}")
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    present = accelerator.type if accelerator is not None else "cpu"
    if device != present:
        raise ConfigError(f"tensor parallelism over {device} processes on a machine with a {present}: transformers "
                          "places each shard on the machine's accelerator; set trainer.accelerator to match it, or "
                          "hide the accelerator (CUDA_VISIBLE_DEVICES=) to shard over CPU processes")


def degree(model: torch.nn.Module) -> int:
    """The tensor-parallel degree ``model`` was loaded with (1: not sharded)."""
    from torch.distributed.tensor import DTensor

    for param in model.parameters():
        if isinstance(param, DTensor):
            return param.device_mesh.size()
    return 1


def load_kwargs(tensor: int) -> dict[str, Any]:
    """``from_pretrained`` arguments that shard the model ``tensor`` ways ({} for 1)."""
    if tensor <= 1:
        return {}
    from transformers.distributed import DistributedConfig

    return {"distributed_config": DistributedConfig(tp_size=tensor)}


@contextlib.contextmanager
def local_rank(rank: int) -> Iterator[None]:
    """``LOCAL_RANK`` set for transformers' loader, which binds each process to that GPU (a SLURM
    launch sets ``SLURM_LOCALID`` instead); put back after."""
    before = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        yield
    finally:
        if before is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = before

"""A decode step captured once as a CUDA graph and replayed, the experts implementation such a step
runs (:func:`capturable_experts`), and ``torch.compile`` of the decoder layers that such steps run
(``model.torch_compile``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lgen.hf.models import base_model, whole_blocks
from lgen.kernels import backend


def compile_layers(model: torch.nn.Module, dynamic: bool | None = None) -> int:
    """``torch.compile`` each decoder layer (the classes a transformers model lists in
    ``_no_split_modules``) for the CUDA-graph decode steps of
    :class:`lgen.decode.steppers.PoolStepper`, which then replay fused kernels.

    Compiling the layers, not the whole model, keeps the compiled code small: dynamo traces each
    layer (its cache index is a constant) and inductor's graph cache serves the copies. ``dynamic``
    is ``torch.compile``'s: by default the first batch shape compiles static and the next makes the
    sizes that changed (rows, cache length) symbolic, so later batches reuse that graph. Everything
    else runs eagerly: the prefill runs with compiled code set aside. Returns the number of layers
    compiled; raises ``ValueError`` for a model that names no decoder layer classes.
    """
    layers = whole_blocks(model)
    if not layers:
        raise ValueError(f"{type(base_model(model)).__name__} names no decoder layer classes (_no_split_modules)")
    for layer in layers:
        if layer._compiled_call_impl is None:  # a second predict on the same model keeps its graphs
            layer.compile(dynamic=dynamic)
    return len(layers)


def experts_for(dtype: torch.dtype) -> str:
    """The experts implementation a CUDA graph can hold for weights of ``dtype``.

    transformers runs a model's experts by the implementation its config names (``eager``: a Python
    loop over the experts a batch hit, which reads on the host which they are; ``grouped_mm``: one
    grouped matmul over tokens sorted by expert, whose fallback for dtypes the kernel lacks reads
    the offsets on the host; ``batched_mm``: each token's experts' weights gathered and multiplied
    at once). A host read cannot be captured ("Cannot copy between CPU and CUDA tensors during CUDA
    graph capture"): ``grouped_mm`` where its kernel takes the dtype (bf16), ``batched_mm``
    otherwise (its gathered weights grow with the rows, which a float32 model on a GPU pays)."""
    return "grouped_mm" if dtype == torch.bfloat16 else "batched_mm"


@contextlib.contextmanager
def capturable_experts(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s experts (if it has any) run :func:`experts_for`'s
    implementation; the model's own is put back after, also on an error."""
    model = base_model(model)
    if not getattr(type(model), "_can_set_experts_implementation", lambda: False)():
        yield
        return
    before = model.get_experts_implementation()
    model.set_experts_implementation(experts_for(next(model.parameters()).dtype))
    try:
        yield
    finally:
        model.set_experts_implementation(before)


# a compiled layer's graphs: up to 3 per layer (static, then symbolic rows, then symbolic cache length),
# all under one function, whose default limit is 8
_RECOMPILES = {"recompile_limit": 4096, "accumulated_recompile_limit": 1 << 16}


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for the captures of steps that run on the default stream."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


class CapturedStep:
    """The model's one-token step over static buffers (``token``, ``mask``, ``next_pos``,
    ``write_at``, ``cache``), captured as a CUDA graph at its first run when ``graph``, and replayed after."""

    graph: bool
    windows: dict[int, int]  # the layers whose decode steps see a window of keys (lgen.decode.cache.windows)
    attends: bool  # some layer attends to keys (a model of state layers only gets no mask: nothing is padding)
    _graph: torch.cuda.CUDAGraph | None

    def _forward(self) -> torch.Tensor:
        """One token per row, at cache index ``write_at`` (the masks' query index) and position ``next_pos``."""
        with (torch._dynamo.config.patch(**_RECOMPILES), backend.use(self.model),
              capturable_experts(self.model) if self.graph else contextlib.nullcontext(),
              backend.queries(self.write_at[:, None], positions=self.next_pos, windows=self.windows)):
            out = self.model(input_ids=self.token, attention_mask=self.mask if self.attends else None,
                             position_ids=self.next_pos, use_cache=True, **{self.cache_arg: self.cache})
        return out.logits[:, -1, :]

    def _capture(self) -> None:
        """Capture the step, after one warm-up run on the capturing stream (it compiles kernels and
        sets up library workspaces outside the capture; :meth:`_warm_up`).

        Unlike ``torch.cuda.graph``, no device-wide synchronize and cache flush, which would stall the
        other pools' work. A pool captures on its own CUDA stream: cuBLAS keeps a workspace per
        stream and a graph keeps the one it was captured with, so graphs captured on one stream
        must not replay at the same time on two. A step on the default stream (one batch at a
        time) captures on a side stream. Should the capture run out of memory, the allocator's
        cache is emptied (what ``torch.cuda.graph`` does every time) and it is tried once more."""
        current = torch.cuda.current_stream()
        side = current == torch.cuda.default_stream(current.device)
        stream = _capture_stream(current.device) if side else current
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._warm_up()
            try:
                graph, out = self._record()
            except torch.cuda.OutOfMemoryError:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                graph, out = self._record()
        current.wait_stream(stream)
        self._graph, self._out = graph, out

    def _warm_up(self) -> None:
        """Run the step once, eagerly, leaving every state as it was: a key written twice at the same
        place is the same key, but a recurrent or conv state updated in place would take the step's
        token twice (the capture then the replay)."""
        kept = [(state, state.clone()) for state in self.states()]
        self._forward()
        for state, before in kept:
            state.copy_(before)

    def states(self) -> list[torch.Tensor]:
        """The buffers a step updates in place from their own values (none here)."""
        return []

    def _record(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """One capture of the step on the current stream."""
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            out = self._forward()
        except BaseException:
            with contextlib.suppress(Exception):
                graph.capture_end()
            raise
        graph.capture_end()
        return graph, out

    def _run(self) -> torch.Tensor:
        """One step's logits: replayed (captured first if need be), or run eagerly."""
        if not self.graph:
            return self._forward()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._out

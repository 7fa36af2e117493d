"""How a run decodes, decided once: which engine, and the switches the engines read.

:meth:`DecodeSettings.choose` holds every refusal of the model keys that pick them (before any
weights load); the frozen result goes to whichever engine runs (:func:`lgen.decode.make_engine`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import GenerationConfig

from lgen.errors import ConfigError
from lgen.hf.architecture import Architecture

# generation settings the compact engines implement
SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "num_return_sequences", "max_new_tokens",
             "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings"}
# settings that change what is returned or how it is computed, not which tokens come out
NEUTRAL = {"output_attentions", "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate",
           "use_cache", "max_length", "transformers_version", "cache_implementation", "compile_config",
           "disable_compile", "is_assistant"}


def unsupported(config: GenerationConfig) -> list[str]:
    """The settings of ``config`` that the compact engines cannot do (``model.generate`` does all)."""
    diff = config.to_diff_dict()
    default = GenerationConfig().to_dict()
    bad = []
    for key, value in diff.items():
        if key in SUPPORTED or key in NEUTRAL or key.startswith("_"):
            continue
        if default.get(key, value) != value or key not in default:
            bad.append(key)
    if (config.num_beams or 1) > 1:
        bad.append("num_beams")
    return sorted(set(bad))


@dataclass(frozen=True)
class DecodeSettings:
    """``engine``: ``compact`` (lgen's own loop: continuous batching, or lockstep under ZeRO-3) or
    ``generate`` (``model.generate``); ``samples``: rows per prompt; ``compact_every``: steps
    between looks at which rows ended; ``cuda_graphs``: replay decode steps from CUDA graphs (where
    they can run, :meth:`on`); ``torch_compile``: compiled decoder layers in those steps;
    ``invariant``: batch-invariant decoding (:mod:`lgen.kernels.invariant`); ``span_attention``:
    decode attention that reads only each row's keys (None: where it runs; off with compiled
    layers, which keep transformers' attention); ``because``: why ``engine: auto`` runs
    ``model.generate`` (the settings and model traits the compact engine lacks); ``one_prompt``:
    ``model.generate`` takes one prompt at a time (the model gets other text for a left-padded row)."""

    engine: Literal["compact", "generate"] = "compact"
    samples: int = 1
    compact_every: int = 4
    cuda_graphs: bool = False
    torch_compile: bool = False
    invariant: bool = False
    span_attention: bool | None = None
    because: tuple[str, ...] = ()
    one_prompt: bool = False

    @classmethod
    def choose(cls, config: GenerationConfig, *, engine: Literal["auto", "compact", "generate"] = "auto",
               compact_every: int = 4, cuda_graphs: bool = True, torch_compile: bool = False,
               batch_invariant: bool = False, prompt_learning: bool = False,
               softcap: float | None = None, architecture: Architecture | None = None) -> DecodeSettings:
        """The settings for ``config`` and the ``model.*`` keys given, or a :class:`ConfigError`
        naming the key to change. ``prompt_learning``: the adapter adds virtual tokens (only
        ``model.generate`` runs them); ``softcap``: the model's attention logit soft-cap;
        ``architecture``: what the model is (:mod:`lgen.hf.architecture`; None: a model the compact
        engine runs)."""
        missing = unsupported(config)
        if prompt_learning:
            missing.append("prompt-learning adapters")  # virtual tokens go through peft's generate
        if engine == "compact" and missing:
            raise ConfigError(f"model.engine: compact does not implement {missing}; use engine: generate or auto")
        traits = architecture.compact_missing() if architecture is not None else []
        if engine == "compact" and traits:
            raise ConfigError(f"model.engine: compact cannot run {architecture.model_type} models: "
                              f"{'; '.join(traits)}; use engine: generate or auto")
        name = "compact" if engine == "compact" or (engine == "auto" and not missing and not traits) else "generate"
        because = ((f"the settings {missing}",) if missing else ()) + tuple(traits) if engine == "auto" else ()
        if compact_every < 1:
            raise ConfigError(f"model.compact_every must be >= 1, got {compact_every}")
        if torch_compile and (name != "compact" or not cuda_graphs):
            raise ConfigError("model.torch_compile compiles the compact engine's CUDA-graph decode steps: it needs "
                              f"engine compact and cuda_graphs: true (here engine {name}, cuda_graphs: "
                              f"{cuda_graphs}{', for ' + str(missing) if missing else ''}); set torch_compile: false")
        if batch_invariant and name != "compact":
            fix = (f"the settings {missing} need it: drop them" if missing else
                   f"the model needs it ({'; '.join(traits)})" if traits else "set model.engine: auto")
            raise ConfigError("model.batch_invariant needs the compact engine (model.generate lays batches out its "
                              f"own way), and the engine here is generate; {fix}, or set batch_invariant: false")
        if batch_invariant and torch_compile:
            raise ConfigError("model.batch_invariant and model.torch_compile do not go together (compiled kernels "
                              "choose their own reductions); set one of them to false")
        if batch_invariant and softcap:
            raise ConfigError(f"model.batch_invariant runs plain softmax attention, and this model soft-caps its "
                              f"attention logits (attn_logit_softcapping: {softcap}); set batch_invariant: false")
        return cls(engine=name, samples=int(config.num_return_sequences or 1), compact_every=compact_every,
                   cuda_graphs=cuda_graphs, torch_compile=torch_compile, invariant=batch_invariant,
                   span_attention=False if torch_compile else None, because=because if name == "generate" else (),
                   one_prompt=name == "generate" and architecture is not None and not architecture.padded_batches)

    def continuous(self, *, lockstep: bool) -> bool:
        """Whether prompts join a running pool (continuous batching): the compact engine, unless
        ranks decode in lockstep (ZeRO-3, where every forward gathers weights from all ranks)."""
        return self.engine == "compact" and not lockstep

    def on(self, device: torch.device, *, sharded: bool = False) -> DecodeSettings:
        """These settings where they run: CUDA graphs only on a CUDA device and without ZeRO-3
        (whose weight gathers a graph cannot hold)."""
        return dataclasses.replace(self, cuda_graphs=self.cuda_graphs and device.type == "cuda" and not sharded)

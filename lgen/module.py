"""Batches to records: load a causal LM in ``configure_model`` and call ``generate`` in ``predict_step``."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteriaList

from lgen import engine as engine_lib
from lgen import models, precision, zero3
from lgen.stopping import BraceMatchingCriteria, Language, finish

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


class GenerationModule(LightningModule):
    """A Hugging Face causal LM that turns prompt batches into records.

    The tokenizer, model config and generation config load at construction (cheap, so bad names
    fail before any weights load); the weights load in ``configure_model``, inside the strategy's
    context, so sharded strategies can place them.

    Args:
        model_name_or_path: a local folder, a Hub name, or an alias (``smollm2-135m-instruct``).
        config_name: model config to use instead of the model's own.
        tokenizer_name: tokenizer to use instead of the model's own.
        use_fast_tokenizer: use the Rust-backed tokenizer.
        model_revision: model version on the Hub (branch, tag or commit).
        token: Hub access token.
        adapter_name_or_path: a PEFT adapter (LoRA, (IA)^3, prompt tuning) to load on the model.
        merge_adapter: merge LoRA / (IA)^3 weights into the model before generating (faster).
        torch_dtype: weight dtype; ``auto`` takes the checkpoint's.
        generation_config_file: a ``generation_config.json`` that replaces the model's own.
        generation_kwargs: settings applied on top of that generation config (e.g. ``do_sample``,
            ``temperature``, ``top_p``, ``num_return_sequences``), so a config file can ask for sampling.
        max_new_tokens: tokens to generate per prompt, or ``auto`` (complete mode: fill ``block_size``).
        use_brace_matching: stop a sequence when the brace opened before it closes.
        brace_matching_start_level: brace level at the start of generation (1 if the prompt ends in ``{``).
        brace_matching_language: lexer rules for braces in strings and comments: ``c``, ``python``, ``plain``.
        stop_strings: stop a sequence at the first of these strings (``finish_reason: stop_string``).
        keep_stop_string: keep the stop string at the end of the prediction.
        engine: ``compact`` drives the decode loop itself and drops finished rows every
            ``compact_every`` steps (greedy and temperature/top-k/top-p sampling with per-row seeded
            samples, brace matching, stop strings; under ZeRO-3 all ranks step together);
            ``generate`` calls ``model.generate`` (every generation setting, prompt-learning
            adapters); ``auto`` picks ``compact`` when it supports the settings.
        compact_every: steps between drops of finished rows (each drop costs one host sync).
        cuda_graphs: on CUDA, the compact engine replays each decode step from a CUDA graph over a
            static cache (one capture per batch bucket: 8, 12, 16, 24, 32, ...); off: eager steps.
        torch_compile: ``torch.compile`` the decoder layers for those CUDA-graph steps (fused
            kernels, a faster step); compiling takes a minute or more, so it pays on long runs only.
        seed: linked from ``seed_everything``; seeds each row's samples.
    """

    def __init__(
        self,
        model_name_or_path: str,
        max_new_tokens: int | Literal["auto"],
        config_name: str | None = None,
        tokenizer_name: str | None = None,
        use_fast_tokenizer: bool = True,
        model_revision: str = "main",
        token: str | None = None,
        adapter_name_or_path: str | None = None,
        merge_adapter: bool = True,
        torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None,
        generation_config_file: str | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        use_brace_matching: bool = False,
        brace_matching_start_level: int = 0,
        brace_matching_language: Language = "c",
        stop_strings: list[str] | None = None,
        keep_stop_string: bool = False,
        engine: Literal["auto", "compact", "generate"] = "auto",
        compact_every: int = 4,
        cuda_graphs: bool = True,
        torch_compile: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.max_new_tokens = max_new_tokens
        self.model_revision = model_revision
        self.token = token
        self.adapter_name_or_path = adapter_name_or_path
        self.merge_adapter = merge_adapter
        self.torch_dtype = torch_dtype
        self.use_brace_matching = use_brace_matching
        self.brace_matching_start_level = brace_matching_start_level
        self.brace_matching_language = brace_matching_language
        self.stop_strings = list(stop_strings or [])
        self.keep_stop_string = keep_stop_string
        if brace_matching_start_level < 0:
            raise ValueError(f"model.brace_matching_start_level must be >= 0, got {brace_matching_start_level}")
        for key, name in (("model.model_name_or_path", model_name_or_path), ("model.config_name", config_name),
                          ("model.tokenizer_name", tokenizer_name),
                          ("model.adapter_name_or_path", adapter_name_or_path),
                          ("model.generation_config_file", generation_config_file)):
            if name is not None and name not in models.ALIASES:
                models.check_exists(name, key)
        self.path = models.resolve(model_name_or_path)
        hub = {"revision": model_revision, "token": token}
        self.tokenizer = self._load(AutoTokenizer.from_pretrained, models.resolve(tokenizer_name or model_name_or_path),
                                    "model.tokenizer_name" if tokenizer_name else "model.model_name_or_path",
                                    use_fast=use_fast_tokenizer, **hub)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_config = self._load(AutoConfig.from_pretrained, models.resolve(config_name or model_name_or_path),
                                       "model.config_name" if config_name else "model.model_name_or_path", **hub)
        self.adapter_config = self._load_adapter_config() if adapter_name_or_path else None
        self.generation_config = self._generation_config(generation_config_file, generation_kwargs or {}, hub)
        missing = engine_lib.unsupported(self.generation_config)
        if self.adapter_config is not None and self.adapter_config.is_prompt_learning:
            missing.append("prompt-learning adapters")  # virtual tokens go through peft's generate
        if engine == "compact" and missing:
            raise ValueError(f"model.engine: compact does not implement {missing}; use engine: generate or auto")
        self.engine = "compact" if engine == "compact" or (engine == "auto" and not missing) else "generate"
        if compact_every < 1:
            raise ValueError(f"model.compact_every must be >= 1, got {compact_every}")
        self.compact_every = compact_every
        self.cuda_graphs = cuda_graphs
        if torch_compile and (self.engine != "compact" or not cuda_graphs):
            raise ValueError("model.torch_compile compiles the compact engine's CUDA-graph decode steps: it needs "
                             f"engine compact and cuda_graphs: true (here engine {self.engine}, cuda_graphs: "
                             f"{cuda_graphs}{', for ' + str(missing) if missing else ''}); set torch_compile: false")
        self.torch_compile = torch_compile
        self.seed = seed
        self.model = None
        self._float32: dict[str, torch.Tensor] = {}  # see configure_model
        self._trace_hook: torch.utils.hooks.RemovableHandle | None = None  # ZeRO-3, during predict
        self.progress: Counter = Counter()

    @staticmethod
    def _load(fn, name: str, key: str, **kwargs: Any) -> Any:
        try:
            return fn(name, **kwargs)
        except OSError as err:
            raise models.hub_error(name, key, err) from err

    def _load_adapter_config(self):
        from peft import PeftConfig

        return self._load(PeftConfig.from_pretrained, self.adapter_name_or_path, "model.adapter_name_or_path",
                          token=self.token)

    def _generation_config(self, file: str | None, overrides: dict[str, Any], hub: dict[str, Any]) -> GenerationConfig:
        if file is not None:
            path = Path(file)
            try:
                config = GenerationConfig.from_dict(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"model.generation_config_file={file!r} is not a readable JSON file: {err}") from err
        else:
            try:
                config = GenerationConfig.from_pretrained(self.path, **hub)
            except OSError:
                config = GenerationConfig.from_model_config(self.model_config)
        for key in ("max_new_tokens", "max_length"):
            if key in overrides:
                raise ValueError(f"model.generation_kwargs: set model.max_new_tokens instead of {key}")
        unknown = config.update(**overrides)
        if unknown:
            raise ValueError(f"model.generation_kwargs: {sorted(unknown)} are not generation settings "
                             "(see transformers.GenerationConfig)")
        if config.do_sample and config.temperature is not None and config.temperature <= 0:
            raise ValueError(f"model.generation_kwargs / generation_config_file: sampling needs temperature > 0, "
                             f"got {config.temperature}; for greedy decoding set do_sample: false")
        if config.num_return_sequences is None:
            config.num_return_sequences = 1
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        if config.stop_strings:  # stop strings from a generation config count like model.stop_strings
            given = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
            self.stop_strings = list(dict.fromkeys(self.stop_strings + given))
        special = [t for t in self.stop_strings if any(sp in t for sp in self.tokenizer.all_special_tokens)]
        if special:
            raise ValueError(f"model.stop_strings: {special} contain special tokens, which are left out of the "
                             "decoded text; to stop on a special token add its id to eos_token_id "
                             "(model.generation_kwargs) instead")
        config.stop_strings = self.stop_strings or None
        return config

    @property
    def num_return_sequences(self) -> int:
        return int(self.generation_config.num_return_sequences or 1)

    @property
    def virtual_tokens(self) -> int:
        """Prompt-tuning virtual tokens, which take room in ``block_size``."""
        return int(getattr(self.adapter_config, "num_virtual_tokens", 0) or 0) if self.adapter_config else 0

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]

    def setup(self, stage: str) -> None:
        # Before configure_model: Lightning builds DeepSpeed's zero.Init from this config around it.
        if self._sharded():
            zero3.inference_config(self.trainer.strategy.config)
        self.check_strategy(self.trainer.strategy)

    def check_strategy(self, strategy: Any) -> None:
        """Refuse settings the trainer's strategy cannot run (the CLI asks before any file is written)."""
        if self.torch_compile and (strategy.root_device.type != "cuda" or getattr(strategy, "zero_stage_3", False)):
            raise ValueError("model.torch_compile needs a CUDA device without ZeRO-3 (the CUDA-graph decode steps "
                             "it compiles run only there); set torch_compile: false")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        sharded = self._sharded()
        if sharded:
            # ZeRO-3: transformers sees this (weakly referenced) config and builds the model already
            # partitioned, loading each weight straight into its shards; it never exists whole on one GPU.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.trainer.strategy.config)
        dtype = DTYPES[self.torch_dtype] if self.torch_dtype else None
        kwargs = {"revision": self.model_revision, "token": self.token, "config": self.model_config}
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = self._load(AutoModelForCausalLM.from_pretrained, self.path, "model.model_name_or_path", **kwargs)
        if self.adapter_name_or_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter_name_or_path, token=self.token)
            if self.merge_adapter and not self.adapter_config.is_prompt_learning:
                model = model.merge_and_unload()
        model.eval()
        if sharded:
            blocks = zero3.leaf_blocks(model, self.trainer.strategy.config)
            log.info("ZeRO-3 gathers these blocks whole: %s", blocks)
        else:  # what is float32 in a bf16 model is so on purpose; the precision's cast comes next
            self._float32 = precision.float32_tensors(model)
        self.model = model

    def on_predict_start(self) -> None:
        # cuDNN's attention builds an execution plan for every new key length, i.e. for every
        # decode step of an eager loop (seen: ~80 ms each on an H100); flash and memory-efficient
        # attention need none.
        if self.device.type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Lightning's bf16-true/16-true cast (and ZeRO-3's zero.Init) rounded what transformers keeps in float32
        precision.restore_float32(self.model, self._float32)
        precision.rotary_in_float32(self.model)
        if self.torch_compile:
            log.info("torch.compile: %d decoder layers", engine_lib.compile_layers(self.model))
        if self._sharded():
            self._trace_hook = zero3.step_per_forward(self.trainer.strategy.model, self.model)

    def on_predict_end(self) -> None:
        if self._trace_hook is not None:
            self._trace_hook.remove()
            self._trace_hook = None

    def config_dumps(self) -> dict[str, dict[str, Any]]:
        """The JSON files written beside the shards, as the seed wrote them."""
        dumps = {
            "model_config.json": self.model_config.to_dict(),
            "model_config_diff.json": self.model_config.to_diff_dict(),
            "generation_config.json": self.generation_config.to_dict(),
            "generation_config_diff.json": self.generation_config.to_diff_dict(),
        }
        if self.adapter_config is not None:
            dumps["adapter_config.json"] = self.adapter_config.to_dict()
        return dumps

    def settings(self) -> dict[str, Any]:
        """What decides the generated text, for the output directory's fingerprint."""
        return {
            "model": self.model_name_or_path, "revision": self.model_revision,
            "adapter": self.adapter_name_or_path, "merge_adapter": self.merge_adapter,
            "dtype": self.torch_dtype, "max_new_tokens": self.max_new_tokens,
            "generation_config": self.generation_config.to_diff_dict(),
            "brace_matching": [self.use_brace_matching, self.brace_matching_start_level, self.brace_matching_language],
            "stop_strings": [self.stop_strings, self.keep_stop_string],
        }

    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, Any]]:
        """Generate for one batch; return one record per (example, sample), or none for a padding batch."""
        if batch["padding"] and not self._synced_gpus():
            return []  # only synced generation (ZeRO-3) needs every rank to step
        criteria = StoppingCriteriaList()
        brace = None
        if self.use_brace_matching:
            brace = BraceMatchingCriteria(self.tokenizer, self.brace_matching_start_level, self.brace_matching_language)
            criteria.append(brace)
        start = time.perf_counter()
        if self.engine == "compact":
            out = engine_lib.generate(
                self.model, batch["input_ids"], batch["attention_mask"], self.generation_config,
                batch["max_new_tokens"], self.eos_token_ids, self.generation_config.pad_token_id, brace,
                self.row_keys(batch["examples"]) if self.generation_config.do_sample else None, self.compact_every,
                cuda_graphs=self.cuda_graphs and self.device.type == "cuda" and not self._sharded(),
                stop_text=self._stop_hits if self.stop_strings else None, synced=self._synced_gpus())
            generated, brace_stop = out.tokens, out.brace_stop
            self.progress["slots"] += out.slots
        else:
            config = copy.deepcopy(self.generation_config)
            config.max_new_tokens = batch["max_new_tokens"]
            output = self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                generation_config=config,
                stopping_criteria=criteria,
                tokenizer=self.tokenizer if self.stop_strings else None,
                synced_gpus=self._synced_gpus(),
            )
            generated, brace_stop = output[:, batch["input_ids"].shape[1]:], None
            self.progress["slots"] += generated.numel()
        finished = finish(generated, self.tokenizer, self.eos_token_ids, brace, self.stop_strings,
                          self.keep_stop_string, brace_stop)
        seconds = time.perf_counter() - start
        if batch["padding"]:
            return []
        self.progress["records"] += len(finished)
        self.progress["tokens"] += sum(f.tokens for f in finished)
        n = self.num_return_sequences
        records = []
        for r, done in enumerate(finished):
            ex = batch["examples"][r // n]
            records.append({
                "id": ex["id"],
                "part": list(ex["part"]),
                "seq": [r % n + 1, n],
                "prompt": self.tokenizer.decode(ex["prompt_ids"], skip_special_tokens=False),
                "reference": ex["reference"],
                "prediction": done.text,
                "finish_reason": done.reason,
                "meta": ex["meta"],
                **ex["keep"],
                "_lgen": {"tokens": done.tokens, "row": ex["row"], "seconds": seconds / len(finished)},
            })
        return records

    def _stop_hits(self, generated: torch.Tensor) -> torch.Tensor:
        """Which rows' text so far holds a stop string (decoded on the host, once per compaction).

        Only the tail can hold a new one: the tokens since the last check plus room for the longest
        string (a character can take up to 4 byte-level tokens). A string missed here, e.g. split by
        special tokens, still cuts the prediction in ``finish``; only the early stop is lost.
        """
        tail = self.compact_every + 4 * max(len(s) for s in self.stop_strings) + 4
        texts = self.tokenizer.batch_decode(generated[:, -tail:].tolist(), skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        hits = [any(s in text for s in self.stop_strings) for text in texts]
        return torch.tensor(hits, dtype=torch.bool, device=generated.device)

    def row_keys(self, examples: list[dict[str, Any]]) -> torch.Tensor:
        """One int64 per output row from (seed, id, part, seq): the row's sampling stream."""
        n = self.num_return_sequences
        keys = []
        for ex in examples:
            for k in range(1, n + 1):
                text = json.dumps([self.seed, ex["id"], list(ex["part"]), k], sort_keys=True, default=str)
                keys.append(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True))
        return torch.tensor(keys, dtype=torch.int64, device=self.device)

    def _sharded(self) -> bool:
        """ZeRO-3 gathers weights in forward hooks, which a CUDA graph cannot replay."""
        return self._trainer is not None and getattr(self._trainer.strategy, "zero_stage_3", False)

    def _synced_gpus(self) -> bool:
        """ZeRO-3 ranks gather each layer's weights together, so all must step until all are done."""
        return self._sharded() and self._trainer.world_size > 1

"""Batches to records: load a causal LM in ``configure_model``, generate in ``predict_step``."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_only
from transformers import AutoConfig, AutoModelForCausalLM

from lgen.batch import Batch
from lgen.data import lengths
from lgen.decode import DecodeSettings, Engine, budget, lockstep, make_engine, sampling, settle
from lgen.decode.braces import Language, token_table
from lgen.decode.deadline import AgreedDeadline, Deadline
from lgen.decode.graphs import compile_layers
from lgen.decode.stopping import BraceMatching, EndOfSequence, Length, StopRules, StopStrings
from lgen.errors import ConfigError
from lgen.hf import generation, models, precision, tensor_parallel, zero3
from lgen.hf.architecture import Architecture
from lgen.hf.layout import Layout
from lgen.output import records

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


class GenerationModule(LightningModule):
    """A Hugging Face causal LM that turns prompt batches into records.

    The tokenizer, model config and generation config load at construction (cheap, so bad names
    fail before any weights load); the weights load in ``configure_model``, inside the strategy's
    context, so sharded strategies can place them.

    Args:
        model_name_or_path: a local folder, a Hub name, or an alias (``smollm2-135m-instruct``).
        max_new_tokens: tokens to generate per prompt, or ``auto`` (complete mode: fill ``block_size``).
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
        batch_invariant: compute each row as if it were alone, bit for bit (matmuls and reductions
            on fixed tiles, attention in fixed chunks from key 0, prompts laid out from position 0):
            records then do not depend on the batch size, the memory budget, ``compact_every``,
            continuous batching or the number of ranks, in any dtype. Costs speed; compact engine only.
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
        batch_invariant: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        lengths.check_new_tokens(max_new_tokens)
        self.model_name_or_path = model_name_or_path
        self.config_name, self.tokenizer_name, self.use_fast_tokenizer = config_name, tokenizer_name, use_fast_tokenizer
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
            raise ConfigError(f"model.brace_matching_start_level must be >= 0, got {brace_matching_start_level}")
        if generation_config_file is not None:
            models.check_file(generation_config_file, "model.generation_config_file")
        # where each name comes from, checked before anything loads; the Hub arguments its loads need
        self._hub = {name: {"revision": revision, "token": token,
                            **models.locate(name, key, revision=revision, token=token)}
                     for key, name, revision in (
                         ("model.model_name_or_path", model_name_or_path, model_revision),
                         ("model.config_name", config_name, model_revision),
                         ("model.tokenizer_name", tokenizer_name, model_revision),
                         ("model.adapter_name_or_path", adapter_name_or_path, "main")) if name is not None}
        self.path = models.resolve(model_name_or_path)
        hub = self._hub[model_name_or_path]
        tokenizer_from = tokenizer_name or model_name_or_path
        self.tokenizer = models.load_tokenizer(tokenizer_from, "model.tokenizer_name" if tokenizer_name
                                               else "model.model_name_or_path", use_fast=use_fast_tokenizer,
                                               **self._hub[tokenizer_from])
        config_from = config_name or model_name_or_path
        self.model_config = models.load(AutoConfig.from_pretrained, models.resolve(config_from),
                                        "model.config_name" if config_name else "model.model_name_or_path",
                                        **self._hub[config_from])
        self.adapter_config = None
        if adapter_name_or_path:
            adapter_hub = {k: v for k, v in self._hub[adapter_name_or_path].items() if k != "revision"}
            self.adapter_config = models.adapter_config(adapter_name_or_path, **adapter_hub)
        self.generation_config = generation.generation_config(
            file=generation_config_file, overrides=generation_kwargs or {}, model_path=self.path, hub=hub,
            model_config=self.model_config, tokenizer=self.tokenizer, stop_strings=self.stop_strings)
        self.stop_strings = list(self.generation_config.stop_strings or [])
        self.architecture = Architecture.of(self.model_config)
        self.decode = DecodeSettings.choose(
            self.generation_config, engine=engine, compact_every=compact_every, cuda_graphs=cuda_graphs,
            torch_compile=torch_compile, batch_invariant=batch_invariant,
            prompt_learning=self.prompt_learning,
            softcap=getattr(self.model_config.get_text_config(decoder=True), "attn_logit_softcapping", None),
            architecture=self.architecture)
        if self.decode.because and rank_zero_only.rank == 0:
            log.warning("engine: auto runs model.generate for this %s model, as %s%s", self.architecture.model_type,
                        "; ".join(self.decode.because),
                        ", one prompt at a time" if self.decode.one_prompt else "")
        self.engine_asked = engine
        self.seed = seed
        self.model = None
        self.engine: Engine | None = None  # built in on_predict_start, when the device is known
        self.layout = Layout()  # how the ranks share the model and the work: set in setup, from the strategy
        self.deadline: Deadline | None = None  # set by lgen.interrupt.GracefulStop for the run
        self.release_weights = True  # at the end of a run (lgen.api.LLM keeps them for its next job)
        self._float32: dict[str, torch.Tensor] = {}  # see configure_model
        self._trace_hook: torch.utils.hooks.RemovableHandle | None = None  # ZeRO-3, during predict

    @property
    def num_return_sequences(self) -> int:
        return int(self.generation_config.num_return_sequences or 1)

    @property
    def prompt_learning(self) -> bool:
        """A prompt-learning adapter (its virtual tokens go through peft's ``generate``)."""
        return self.adapter_config is not None and self.adapter_config.is_prompt_learning

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

    @property
    def engine_name(self) -> str:
        return self.decode.engine

    @property
    def batch_invariant(self) -> bool:
        return self.decode.invariant

    def stop_rules(self) -> StopRules:
        """This run's stopping rules, in precedence order (see :mod:`lgen.decode.stopping`)."""
        rules = []
        if self.use_brace_matching:
            rules.append(BraceMatching(token_table(self.tokenizer, self.brace_matching_language),
                                       start_level=self.brace_matching_start_level,
                                       language=self.brace_matching_language))
        if self.stop_strings:
            rules.append(StopStrings(self.stop_strings, self.tokenizer, keep=self.keep_stop_string))
        return StopRules([*rules, EndOfSequence(self.eos_token_ids), Length()])

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        self.layout = Layout.of(strategy)
        # Before configure_model: Lightning builds DeepSpeed's zero.Init from this config around it.
        if self.layout.zero3:
            zero3.inference_config(strategy.config)
        self.check_layout(self.layout)

    def check_layout(self, layout: Layout) -> None:
        """Refuse settings the run's layout cannot run (``lgen predict`` and ``LLM`` ask before any
        file is written, Lightning's ``setup`` again for a trainer built another way)."""
        if layout.tensor > 1:
            if self.decode.torch_compile:
                raise ConfigError("model.torch_compile is not supported with tensor parallelism yet (its compiled "
                                  "steps were not checked over sharded weights); set torch_compile: false")
            tensor_parallel.check(self.model_config, tensor=layout.tensor, data=layout.data,
                                  adapter=self.adapter_name_or_path, device=layout.device)
        if self.decode.torch_compile and (layout.device != "cuda" or layout.zero3):
            raise ConfigError("model.torch_compile needs a CUDA device without ZeRO-3 (the CUDA-graph decode steps "
                              "it compiles run only there); set torch_compile: false")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.layout.zero3:
            # ZeRO-3: transformers sees this (weakly referenced) config and builds the model already
            # partitioned, loading each weight straight into its shards; it never exists whole on one GPU.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.trainer.strategy.config)
        # use_kernels: not transformers' Hub kernels, which swap layers for code fetched at load time (offline,
        # a failed load), so that the model runs the code lgen was tested with, the same on every machine
        kwargs = {**self._hub[self.model_name_or_path], "config": self.model_config, "use_kernels": False,
                  **tensor_parallel.load_kwargs(self.layout.tensor)}
        if self.torch_dtype:
            kwargs["dtype"] = DTYPES[self.torch_dtype]
        if self.batch_invariant:  # the mode's attention stands behind transformers' sdpa name
            kwargs["attn_implementation"] = "sdpa"
        try:
            with (tensor_parallel.local_rank(self.trainer.strategy.local_rank) if self.layout.tensor > 1
                  else contextlib.nullcontext()):
                model = models.load(AutoModelForCausalLM.from_pretrained, self.path, "model.model_name_or_path",
                                    **kwargs)
        except ValueError as err:
            if not self.batch_invariant or "sdpa" not in str(err).lower():
                raise
            raise ConfigError(f"model.batch_invariant runs attention through transformers' SDPA interface, which "
                              f"this model does not support ({err}); set batch_invariant: false") from err
        if self.adapter_name_or_path:
            adapter_hub = {k: v for k, v in self._hub[self.adapter_name_or_path].items() if k != "revision"}
            model = models.load_adapter(model, self.adapter_name_or_path,
                                        merge=self.merge_adapter and not self.adapter_config.is_prompt_learning,
                                        **adapter_hub)
        model.eval()
        if self.layout.tensor > 1 and self.global_rank == 0:
            log.info("tensor parallel: %d ranks each hold 1/%d of the model's heads and MLP",
                     tensor_parallel.degree(model), self.layout.tensor)
        if self.layout.zero3:
            blocks = zero3.leaf_blocks(model, self.trainer.strategy.config)
            log.info("ZeRO-3 gathers these blocks whole: %s", blocks)
        else:  # what is float32 in a bf16 model is so on purpose; the precision's cast comes next
            self._float32 = precision.float32_tensors(model)
        self.model = model

    def on_predict_start(self) -> None:
        # Lightning's bf16-true/16-true cast (and ZeRO-3's zero.Init) rounded what transformers keeps in float32
        precision.restore_float32(self.model, self._float32)
        precision.rotary_in_float32(self.model)
        if self.decode.torch_compile:
            try:
                log.info("torch.compile: %d decoder layers", compile_layers(self.model))
            except ValueError as err:
                raise ConfigError(f"model.torch_compile: {err}, so there is nothing to compile; "
                                  "set model.torch_compile: false") from err
        if self.layout.zero3:
            self._trace_hook = zero3.step_per_forward(self.trainer.strategy.model, self.model)
        chosen = self.decode
        self.decode = settle(chosen, self.model, asked=self.engine_asked, lockstep=self.layout.lockstep,
                             poolable=not self.architecture.compact_missing() and not self.prompt_learning)
        if self.decode.engine != chosen.engine and self.global_rank == 0:
            log.warning("engine: auto runs model.generate for this %s model, one prompt at a time: %s",
                        self.architecture.model_type, "; ".join(self.decode.because))
        self.engine = make_engine(self.decode.on(self.device, sharded=self.layout.zero3), self.generation_config,
                                  rules=self.stop_rules, tokenizer=self.tokenizer,
                                  pad_token_id=self.generation_config.pad_token_id, lockstep=self.layout.lockstep)

    def engine_summary(self) -> dict[str, Any]:
        """What ``summary.json`` says of the engine a run used, and why ``engine: auto`` chose
        ``model.generate``."""
        return {"engine": self.decode.engine, **({"engine_reason": "; ".join(self.decode.because)}
                                                   if self.decode.because else {}),
                **({"one_prompt_at_a_time": True} if self.decode.one_prompt else {})}

    def configure_callbacks(self) -> list[Callback]:
        return [_EndOfRun()]

    def end_run(self) -> None:
        """When prediction ends, normally or by an exception (a signal, a full disk): take off the
        ZeRO-3 trace hook, and let go of the weights, which Lightning's teardown would otherwise
        copy to host memory only to drop them (an 8B model in bf16 on an H200: about 12 s)."""
        if self._trace_hook is not None:
            self._trace_hook.remove()
            self._trace_hook = None
        if self.release_weights and not self.layout.zero3:  # ZeRO-3's strategy lets go of its partitioned weights
            self.model = None

    def token_budget(self, prompt_lengths: list[int], row_span: int) -> int | None:
        """``max_batch_tokens: auto``: the batch tokens that fit in the memory this device has left
        after the weights, the least over all ranks (the plan must be global); None (no cap) off CUDA."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        mine = budget.token_budget(self.model, free, row_span=row_span, prompt_width=max(prompt_lengths, default=1))
        least = int(self.trainer.strategy.reduce(torch.tensor(mine, device=self.device),
                                                 reduce_op=torch.distributed.ReduceOp.MIN))
        log.info("data.max_batch_tokens: auto -> %d tokens (%.1f GiB free on this rank)", least, free / 2**30)
        return least

    def config_dumps(self) -> dict[str, dict[str, Any]]:
        """The JSON files written beside the shards, as run_gen.py wrote them."""
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
            **({"batch_invariant": True} if self.batch_invariant else {}),
            "config": self.config_name, "tokenizer": [self.tokenizer_name, self.use_fast_tokenizer],
            "engine": self.engine_name,
        }

    def predict_step(self, batch: Batch, batch_idx: int = 0) -> records.BatchRecords:
        """Generate for one batch; return the records that finished (with continuous batching also
        earlier batches' rows). A padding batch writes nothing; only synced ranks (ZeRO-3) run it,
        to join the other ranks' forwards."""
        if batch.padding and not self.layout.lockstep:
            return records.BatchRecords()
        samples = self.num_return_sequences
        keys = None
        if self.generation_config.do_sample:
            keys = sampling.row_keys(self.seed, batch.examples, samples, self.device)
        deadline = self.deadline
        if deadline is not None and self.layout.tensor > 1:  # the group stops at the same step
            deadline = AgreedDeadline(deadline, lambda flag: lockstep.any_rank(flag, self.device))
        self._mark = time.perf_counter()
        out = self.engine.generate(self.model, batch, row_keys=keys, deadline=deadline, emit=self._emit)
        if batch.padding:
            return records.BatchRecords(dropped=out.dropped)
        return self._batch_records(out.rows, slots=out.slots, dropped=out.dropped)

    def _batch_records(self, rows: list, *, slots: int = 0, dropped: int = 0) -> records.BatchRecords:
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        return records.BatchRecords(
            records=records.build(rows, samples=self.num_return_sequences, tokenizer=self.tokenizer),
            tokens=[f.tokens for _, _, f in rows], seconds=seconds, slots=slots, dropped=dropped)

    def _emit(self, rows: list) -> None:
        """Rows a long call (a pool's drain) finished before it ended: out to the callbacks that take
        records (``on_records``: the writer, the progress bar) now, not when the call ends, so they
        are on disk and counted as they finish."""
        prediction = self._batch_records(rows)
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "on_records", None)
            if hook is not None:
                hook(self.trainer, self, prediction)


class _EndOfRun(Callback):
    """Calls :meth:`GenerationModule.end_run` at the end of prediction, also when it failed or was
    stopped (Lightning calls callbacks' ``on_exception``, and no LightningModule hook, then)."""

    def on_predict_end(self, trainer: Any, pl_module: GenerationModule) -> None:
        pl_module.end_run()

    def on_exception(self, trainer: Any, pl_module: GenerationModule, exception: BaseException) -> None:
        pl_module.end_run()

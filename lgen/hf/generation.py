"""The generation config a run decodes with: the model's own (or a file), the ``generation_kwargs``
on top, and every setting checked before any weights load."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from lgen.errors import ConfigError

WHERE = "model.generation_kwargs / generation_config_file"


def _number(config: GenerationConfig | SimpleNamespace, key: str, *, integer: bool = False) -> float | int | None:
    value = getattr(config, key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{WHERE}: {key} must be {kind}, got {value!r}")
    return value


def check_sampling(config: GenerationConfig | SimpleNamespace) -> None:
    """Refuse generation settings out of range before any weights load: transformers would run some
    of them as something else (``num_return_sequences: 0`` as 1) and fail on others mid-run."""
    n = _number(config, "num_return_sequences", integer=True)
    beams = _number(config, "num_beams", integer=True)
    top_k = _number(config, "top_k", integer=True)
    temperature, top_p = _number(config, "temperature"), _number(config, "top_p")
    if n is not None and n < 1:
        raise ConfigError(f"{WHERE}: num_return_sequences must be >= 1, got {n}")
    if beams is not None and beams < 1:
        raise ConfigError(f"{WHERE}: num_beams must be >= 1, got {beams}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"{WHERE}: top_k must be >= 0 (0: no top-k cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"{WHERE}: top_p must be in (0, 1], got {top_p}")
    if config.do_sample and temperature is not None and temperature <= 0:
        raise ConfigError(f"{WHERE}: sampling needs temperature > 0, got {temperature}; for greedy decoding set "
                          "do_sample: false")
    n, beams = n or 1, beams or 1
    if beams > 1 and n > beams:
        raise ConfigError(f"{WHERE}: beam search returns at most num_beams sequences: num_return_sequences={n} > "
                          f"num_beams={beams}; raise num_beams or lower num_return_sequences")
    if not config.do_sample and beams == 1 and n > 1:
        raise ConfigError(f"{WHERE}: num_return_sequences={n} with greedy decoding gives {n} identical sequences; "
                          "set do_sample: true (a generation_kwargs given later, e.g. on the command line, replaces "
                          "the whole dict, so repeat do_sample there)")


def check_stop_strings(stop_strings: list[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse stop strings that would end every row at once, or that decoded text never holds."""
    if any(not isinstance(t, str) or not t for t in stop_strings):
        raise ConfigError(f"model.stop_strings: {stop_strings} holds an empty string (or one that is not "
                          "text), which would end every row at once; give non-empty strings")
    special = [t for t in stop_strings if any(sp in t for sp in tokenizer.all_special_tokens)]
    if special:
        raise ConfigError(f"model.stop_strings: {special} contain special tokens, which are left out of the "
                          "decoded text; to stop on a special token add its id to eos_token_id "
                          "(model.generation_kwargs) instead")


def generation_config(*, file: str | None, overrides: dict[str, Any], model_path: str, hub: dict[str, Any],
                      model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                      stop_strings: list[str]) -> GenerationConfig:
    """``file`` (or the model's own generation config, or one derived from its config) with
    ``overrides`` applied and checked. Its ``stop_strings`` are ``stop_strings`` and the config's
    own, together (a config's stop strings count like ``model.stop_strings``)."""
    if file is not None:
        try:
            config = GenerationConfig.from_dict(json.loads(Path(file).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"model.generation_config_file={file!r} is not a readable JSON file: {err}") from err
    else:
        try:
            config = GenerationConfig.from_pretrained(model_path, **hub)
        except OSError:
            config = GenerationConfig.from_model_config(model_config)
    for key in ("max_new_tokens", "max_length"):
        if key in overrides:
            raise ConfigError(f"model.generation_kwargs: set model.max_new_tokens instead of {key}")
    unknown = sorted(key for key in overrides if not hasattr(config, key))
    if unknown:
        raise ConfigError(f"model.generation_kwargs: {unknown} are not generation settings "
                          "(see transformers.GenerationConfig)")
    check_sampling(SimpleNamespace(**{**config.to_dict(), **overrides}))  # before transformers' own checks
    try:
        config.update(**overrides)
    except ValueError as err:
        raise ConfigError(f"model.generation_kwargs: {err}") from None
    if config.num_return_sequences is None:
        config.num_return_sequences = 1
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.stop_strings:
        given = [config.stop_strings] if isinstance(config.stop_strings, str) else list(config.stop_strings)
        stop_strings = list(dict.fromkeys(stop_strings + given))
    check_stop_strings(stop_strings, tokenizer)
    config.stop_strings = stop_strings or None
    return config

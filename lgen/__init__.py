"""lgen: batch text and code generation with Hugging Face causal LMs on PyTorch Lightning."""

__version__ = "0.2.0"


def __getattr__(name: str):
    """``lgen.LLM`` without importing torch and Lightning for ``lgen --help``."""
    if name == "LLM":
        from lgen.api import LLM

        return LLM
    raise AttributeError(f"module 'lgen' has no attribute {name!r}")

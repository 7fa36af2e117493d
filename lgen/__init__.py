"""lgen: batch text and code generation with Hugging Face causal LMs on PyTorch Lightning."""

__version__ = "0.2.0"

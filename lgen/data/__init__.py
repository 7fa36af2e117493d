"""Rows to planned batches: loading (:mod:`.sources`), cutting rows into prompts (:mod:`.windows`),
lengths (:mod:`.lengths`), the batch plan (:mod:`.plan`), and the ``LightningDataModule`` that
runs them (:mod:`.datamodule`)."""

from lgen.data.datamodule import GenerationDataModule

__all__ = ["GenerationDataModule"]

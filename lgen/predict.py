"""``lgen predict``: LightningCLI set up for prediction only.

This is the one place that leans on LightningCLI's internals (``subcommands``,
``_prepare_subcommand_parser``, ``instantiate_classes``, ``_instantiate_trainer``), to keep the
``predict`` subcommand only, send records to disk instead of memory, and build and connect the
parts in the order generation needs: the output directory is checked before anything loads, the
strategy is known before the data is connected, and the directory is prepared before the run.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lgen import outputs, zero3
from lgen.data import GenerationDataModule
from lgen.module import GenerationModule
from lgen.progress import GenerationProgressBar
from lgen.writer import JsonlWriter


def _seed(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class LgenCLI(LightningCLI):
    """LightningCLI with the ``predict`` subcommand only, run_gen.py's top-level keys, and the links
    between the model and data sides (``max_new_tokens``, ``token``, the seed)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults(return_predictions=False)  # records go to disk; memory stays flat
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output_dir", type=str, required=True,
                            help="Directory for the JSONL shards, config dumps and summary.")
        parser.add_argument("--overwrite_output_dir", type=bool, default=False,
                            help="Delete the files lgen wrote in output_dir before starting (never other files).")
        parser.add_argument("--merge", type=bool, default=False,
                            help="Write merged.{split}.jsonl in dataset order when the run ends.")
        parser.link_arguments("model.max_new_tokens", "data.max_new_tokens")
        parser.link_arguments("model.token", "data.token")
        parser.link_arguments("seed_everything", "data.seed", compute_fn=_seed)
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_seed)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        outputs.check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)

    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule: GenerationDataModule = self._get(self.config_init, "data")
        self.model: GenerationModule = self._get(self.config_init, "model")
        cfg = self.config_init[self.subcommand]
        model, data = self.model, self.datamodule
        output = outputs.OutputDir(cfg.output_dir, data.dataset_split)
        config_text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        self.writer = JsonlWriter(output, config_text=config_text, merge=cfg.merge)
        self.trainer = self.instantiate_trainer()
        strategy = self.trainer.strategy
        model.check_strategy(strategy)
        data.connect(model.tokenizer,
                     max_position_embeddings=getattr(model.model_config, "max_position_embeddings", None),
                     reserved_tokens=model.virtual_tokens, samples=model.num_return_sequences,
                     token_budget=model.token_budget, lockstep=zero3.lockstep(strategy))
        fingerprint = {"split": data.dataset_split, "data": data.settings(), "model": model.settings(),
                       "seed": data.seed}
        data.skip(output.prepare(fingerprint, overwrite=cfg.overwrite_output_dir, rank=rank_zero_only.rank,
                                 samples=model.num_return_sequences))

    def instantiate_trainer(self, **kwargs: Any):
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra.append(self.writer)
        if trainer_config.get("enable_progress_bar", True) is not False:
            extra.append(GenerationProgressBar())
        return self._instantiate_trainer(trainer_config, extra)

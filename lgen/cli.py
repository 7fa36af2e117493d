"""``lgen predict`` (LightningCLI, predict only) and ``lgen merge``: builds the parts and connects them."""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lgen import outputs
from lgen.data import ConfigError, GenerationDataModule
from lgen.module import GenerationModule
from lgen.progress import GenerationProgressBar
from lgen.writer import JsonlWriter

log = logging.getLogger("lgen")


def _seed(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class LgenCLI(LightningCLI):
    """LightningCLI with the ``predict`` subcommand only, the seed's top-level keys, and the links
    between the model and data sides (``max_new_tokens``, ``token``, the tokenizer)."""

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
        out, split = cfg.output_dir, self.datamodule.dataset_split
        model, data = self.model, self.datamodule
        data.connect(model.tokenizer, getattr(model.model_config, "max_position_embeddings", None),
                     reserved_tokens=model.virtual_tokens, samples=model.num_return_sequences)
        fingerprint = {
            "split": split,
            "data": data_fingerprint(data),
            "model": model.settings(),
            "seed": data.seed,
        }
        if cfg.overwrite_output_dir:
            if rank_zero_only.rank == 0:
                outputs.clear_output_dir(out)
            done: set = set()
        else:
            if Path(out).is_dir():
                outputs.check_fingerprint(out, fingerprint)
                if rank_zero_only.rank == 0:
                    for shard in outputs.shards(out, split):
                        outputs.drop_torn_tail(shard)
            done = outputs.done_keys(out, split)
            if done:
                log.info("resuming: %d records already in %s are skipped", len(done), out)
        data.done = outputs.complete_examples(done, model.num_return_sequences)
        config_text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        self.writer = JsonlWriter(out, split, done, config_text, fingerprint, merge=cfg.merge)
        self.trainer = self.instantiate_trainer()
        model.check_strategy(self.trainer.strategy)

    def instantiate_trainer(self, **kwargs: Any):
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        extra.append(self.writer)
        if trainer_config.get("enable_progress_bar", True) is not False:
            extra.append(GenerationProgressBar())
        return self._instantiate_trainer(trainer_config, extra)


def data_fingerprint(data: GenerationDataModule) -> dict[str, Any]:
    """The data settings that decide the prompts, plus a content hash of local files."""
    files = {}
    for f in data.data_files or []:
        p = Path(f)
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files[f] = h.hexdigest()
    return {
        "dataset_name": data.dataset_name, "dataset_config_name": data.dataset_config_name,
        "dataset_revision": data.dataset_revision, "data_files": files or data.data_files,
        "text_column_name": data.text_column_name, "reference_column_name": data.reference_column_name,
        "id_column_name": data.id_column_name, "mode": data.mode, "block_size": data.resolved_block_size,
        "max_window_size": data.resolved_window, "subsamples": data.subsamples,
    }


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lgen merge", description="Merge the shards of an output directory "
                                     "into merged.{split}.jsonl, in dataset order, each record once.")
    parser.add_argument("output_dir")
    parser.add_argument("--split", help="the split to merge (default: the only one there)")
    args = parser.parse_args(argv)
    splits = sorted({m.group(3) for p in Path(args.output_dir).glob("*.jsonl") if (m := outputs.SHARD.match(p.name))})
    split = args.split
    if split is None:
        if len(splits) != 1:
            parser.error(f"{args.output_dir} holds shards of splits {splits}; choose one with --split")
        split = splits[0]
    summary = Path(args.output_dir) / "summary.json"
    expected = None
    if summary.is_file():
        import json

        expected = json.loads(summary.read_text()).get("records_expected")
    path = outputs.merge(args.output_dir, split, expected)
    print(path)
    return 0


def _close_process_group() -> None:
    """End this rank's process group when its run is done. Left to interpreter exit, rank 0 (which
    hosts the rendezvous store and writes the summary last) can exit first, and the other ranks'
    NCCL watchdogs then print store connection errors with C++ stack traces after a good run. No
    barrier: a rank whose rank-0-only work failed must not leave the others waiting."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # lgen's batch sampler is the plan itself; Lightning's advice about drop_last does not apply
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] == "merge":
            return merge_main(args[1:])
        LgenCLI(
            GenerationModule,
            GenerationDataModule,
            args=argv,
            save_config_callback=None,
            auto_configure_optimizers=False,
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                              "use_distributed_sampler": False},
            parser_kwargs={"prog": "lgen"},
        )
        _close_process_group()
    except (ConfigError, outputs.OutputDirError, FileNotFoundError, OSError, ValueError) as err:
        print(f"lgen: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

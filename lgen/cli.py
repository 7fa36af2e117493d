"""The ``lgen`` command: ``lgen predict`` and ``lgen merge``, and how errors reach the user.

What the user must fix (:class:`lgen.errors.UserError`) is printed as one line, exit code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from lgen import outputs
from lgen.errors import LgenError
from lgen.merge import merge

log = logging.getLogger("lgen")


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
        expected = json.loads(summary.read_text()).get("records_expected")
    path = merge(args.output_dir, split, expected)
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
        from lgen.data import GenerationDataModule
        from lgen.module import GenerationModule
        from lgen.predict import LgenCLI

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
    except LgenError as err:
        print(f"lgen: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

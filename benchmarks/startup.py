"""Where an ``lgen predict`` run's time goes before and after generation: imports, the CLI and
config, the tokenizer and model config, the data pass, the output directory, the weights, the
first batch (graph captures), generation, and the end of the run.

    python benchmarks/startup.py -- --config configs/quickstart.yaml [lgen predict options]

Runs ``lgen predict`` in this process with a timer around each phase and prints one line each
(seconds, and the share of the whole run). A phase inside another is counted in both.
"""

from __future__ import annotations

import functools
import sys
import time

START = time.perf_counter()
PHASES: dict[str, float] = {}


def timed(owner: object, name: str, label: str) -> None:
    """Add the time of every call of ``owner.name`` to ``PHASES[label]``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            PHASES[label] = PHASES.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    t = time.perf_counter()
    from lgen import cli, module, predict
    from lgen.data import datamodule
    from lgen.output import directory

    PHASES["imports (lgen, torch, Lightning, transformers, datasets)"] = time.perf_counter() - t
    timed(predict.LgenCLI, "parse_arguments", "CLI: parse the config")
    timed(module.GenerationModule, "__init__", "model side: tokenizer, model and generation configs")
    timed(datamodule.GenerationDataModule, "setup", "data: load, tokenize, plan")
    timed(directory.OutputDir, "prepare", "output directory: fingerprint, resume")
    timed(predict.LgenCLI, "instantiate_trainer", "trainer")
    timed(module.GenerationModule, "configure_model", "weights: load")
    timed(module.GenerationModule, "on_predict_start", "engine: build")
    first = {"done": False}
    step = module.GenerationModule.predict_step

    def predict_step(self, batch, batch_idx=0):
        t = time.perf_counter()
        try:
            return step(self, batch, batch_idx)
        finally:
            label = "generation: the first batch" if not first["done"] else "generation: the other batches"
            first["done"] = True
            PHASES[label] = PHASES.get(label, 0.0) + time.perf_counter() - t

    module.GenerationModule.predict_step = predict_step
    timed(predict.LgenCLI, "predict", "trainer.predict, all of it")
    code = cli.main(["predict", *argv])
    total = time.perf_counter() - START
    print(f"exit code {code}; whole run {total:.2f} s (this process, from its first line)")
    for label, seconds in PHASES.items():
        print(f"{seconds:8.2f} s {seconds / total:6.1%}  {label}")


if __name__ == "__main__":
    main()

"""The architecture matrix as a table: for every causal-LM type of the installed transformers (and
the variants of ``tests/architectures.py``), the engine ``engine: auto`` runs, why, and how many of
the 6 prompts get ``model.generate``'s text alone, for ``engine: auto`` and ``engine: generate``.
``--write`` saves the engines to ``tests/architectures.json``, which ``tests/test_architectures.py``
holds later runs to. On a GPU (``--device cuda``) the compact engine runs its CUDA graphs;
``--dtype bfloat16`` counts what bf16 rounding changes.

    .venv/bin/python benchmarks/architectures.py [--write] [--markdown] [TYPE ...]
    python benchmarks/architectures.py --device cuda --dtype bfloat16 --gpu-families
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="types to run (default: all)")
    parser.add_argument("--write", action="store_true", help="save the engines to tests/architectures.json")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--gpu-families", action="store_true", help="the types of tests/test_gpu_architectures.py")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import tempfile

    import pytest
    import torch
    import transformers
    from architectures import names
    from conftest import make_word_tokenizer
    from test_architectures import CONFIG, VOCAB, load, prompts, texts

    from lgen.decode import DecodeSettings, settle
    from lgen.hf.architecture import Architecture

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tok = make_word_tokenizer(Path(tempfile.mkdtemp()), words=VOCAB - 4)
    rows, table, engines = prompts(), [], {}
    if args.gpu_families:
        from test_gpu_architectures import FAMILIES

        args.types = FAMILIES
    dtype = getattr(torch, args.dtype)
    for name in args.types or names():
        start = time.perf_counter()
        try:
            model, reference = load(name, tok, rows, device=args.device, dtype=dtype)
        except pytest.skip.Exception as skip:
            table.append((name, "not built", str(skip.msg).split(": ", 1)[-1][:100], "", ""))
            continue
        architecture = Architecture.of(model.config, type(model))
        poolable = not architecture.compact_missing()
        results = {}
        for engine in ("auto", "generate"):
            settings = settle(DecodeSettings.choose(CONFIG, engine=engine, architecture=architecture), model,
                              asked=engine, poolable=poolable)
            got = texts(model, tok, settings, rows)
            results[engine] = settings, sum(a == b for a, b in zip(got, reference))
        auto, equal = results["auto"]
        engine = auto.engine + (", one prompt" if auto.one_prompt else "")
        engines[name] = engine
        table.append((name, engine, "; ".join(auto.because), f"{equal}/{len(rows)}",
                      f"{results['generate'][1]}/{len(rows)} ({time.perf_counter() - start:.1f} s)"))
        print(" | ".join(table[-1]), file=sys.stderr, flush=True)
    counts = Counter(row[1] for row in table)
    if args.markdown:
        print("| type | engine: auto | why model.generate | auto: prompts as alone | generate: prompts as alone |")
        print("|---|---|---|---|---|")
        for row in table:
            print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    ran = [r for r in table if r[1] != "not built"]
    total = len(rows) * len(ran)
    auto, generate = (sum(int(r[column].split("/")[0]) for r in ran) for column in (3, 4))
    print(f"transformers {transformers.__version__}, {args.device}, {args.dtype}: {len(table)} types; " +
          ", ".join(f"{n} {k}" for k, n in counts.most_common()) +
          f"; prompts with generate's text alone: engine auto {auto}/{total}, engine generate {generate}/{total}")
    if args.write:
        path = TESTS / "architectures.json"
        path.write_text(json.dumps({"transformers": transformers.__version__, "engines": engines}, indent=1,
                                   sort_keys=True) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

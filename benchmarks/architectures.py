"""The architecture matrix as a table: for every causal-LM type of the installed transformers (and
the variants of ``tests/architectures.py``), the engine ``engine: auto`` runs, why, and whether the
text of every prompt equals ``model.generate``'s alone, for ``engine: auto`` and ``engine:
generate``. ``--write`` saves the engines to ``tests/architectures.json``, which
``tests/test_architectures.py`` holds later runs to.

    .venv/bin/python benchmarks/architectures.py [--write] [--markdown] [TYPE ...]
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
    for name in args.types or names():
        start = time.perf_counter()
        try:
            model, reference = load(name, tok, rows)
        except pytest.skip.Exception as skip:
            table.append((name, "not built", str(skip.msg).split(": ", 1)[-1][:100], "", ""))
            continue
        architecture = Architecture.of(model.config)
        poolable = not architecture.compact_missing()
        results = {}
        for engine in ("auto", "generate"):
            settings = settle(DecodeSettings.choose(CONFIG, engine=engine, architecture=architecture), model,
                              asked=engine, poolable=poolable)
            results[engine] = settings, texts(model, tok, settings, rows) == reference
        auto, equal = results["auto"]
        engine = auto.engine + (", one prompt" if auto.one_prompt else "")
        engines[name] = engine
        table.append((name, engine, "; ".join(auto.because), "equal" if equal else "DIFFERENT",
                      f"{'equal' if results['generate'][1] else 'DIFFERENT'} ({time.perf_counter() - start:.1f} s)"))
        print(" | ".join(table[-1]), file=sys.stderr, flush=True)
    counts = Counter(row[1] for row in table)
    if args.markdown:
        print("| type | engine: auto | why model.generate | auto = generate alone | engine: generate |")
        print("|---|---|---|---|---|")
        for row in table:
            print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    print(f"transformers {transformers.__version__}: {len(table)} types; " +
          ", ".join(f"{n} {k}" for k, n in counts.most_common()) +
          f"; {sum(r[3] == 'DIFFERENT' or 'DIFFERENT' in r[4] for r in table)} with different text")
    if args.write:
        path = TESTS / "architectures.json"
        path.write_text(json.dumps({"transformers": transformers.__version__, "engines": engines}, indent=1,
                                   sort_keys=True) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

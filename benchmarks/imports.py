"""Which packages an ``lgen predict`` run imports, how long each takes, and who pulls it in.

    python benchmarks/imports.py -- --config configs/quickstart.yaml [lgen predict options]
    python benchmarks/imports.py --statement "import lightning.pytorch"

Runs the command in a child ``python -X importtime`` and sums each module's own import time by
package (``torch`` split by its subpackage), then prints, for the largest ones, the chain of
imports that first brought them in. The child's whole wall time is printed too, since
``-X importtime`` leaves out what happens between imports (loading shared libraries, CUDA).
One process only: under ``-c`` Lightning cannot start DDP's other processes (it re-runs the
script it was started with).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def package(module: str) -> str:
    """The name imports are summed under: the top-level package, ``torch`` by its subpackage."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "torch" and len(parts) > 1 else parts[0]


def parse(text: str) -> list[tuple[int, str, int, int]]:
    """(depth, module, own microseconds, cumulative microseconds), in the order Python printed them
    (a module's imports come before it)."""
    rows = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            rows.append((len(m.group(3)), m.group(4), int(m.group(1)), int(m.group(2))))
    return rows


def chain(rows: list[tuple[int, str, int, int]], index: int) -> list[str]:
    """The modules whose import first imported ``rows[index]``, nearest first."""
    depth, names = rows[index][0], []
    for row in rows[index + 1:]:
        if row[0] < depth:
            names.append(row[1])
            depth = row[0]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statement", help="Python to time instead of an lgen predict run")
    parser.add_argument("--top", type=int, default=20, help="packages to list")
    parser.add_argument("--chains", type=int, default=8, help="packages to show the import chain of")
    own, rest = parser.parse_known_args(sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:])
    if rest:
        parser.error(f"unknown arguments {rest}; put lgen predict options after --")
    code = own.statement or "import sys; from lgen import cli; sys.exit(cli.main(['predict', *sys.argv[1:]]))"
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *argv],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    rows = parse(done.stderr)
    own_time: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    first: dict[str, int] = {}
    for i, (_, module, us, _) in enumerate(rows):
        own_time[package(module)] += us
        count[package(module)] += 1
        first.setdefault(package(module), i)  # the first module of a package printed: its first import
    if done.returncode:
        print("\n".join([line for line in done.stderr.splitlines() if not line.startswith("import time:")][-20:]))
    total = sum(own_time.values()) / 1e6
    print(f"exit code {done.returncode}; wall {wall:.2f} s; imports {total:.2f} s over {len(rows)} modules")
    for name, us in own_time.most_common(own.top):
        print(f"{us / 1e6:8.2f} s {us / 1e6 / wall:6.1%} {count[name]:5d} modules  {name}")
    for name, _ in own_time.most_common(own.chains):
        via = [m for m in chain(rows, first[name]) if package(m) != name]
        print(f"{name} <- {' <- '.join(via[:6]) or '(the command)'}")


if __name__ == "__main__":
    main()

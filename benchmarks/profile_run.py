"""Where an ``lgen predict`` run's generation time goes on a GPU: the engine's host phases and the
GPU's kernels, from the first generated batch to the end of the run.

    python benchmarks/profile_run.py OUT/profile.txt [--kernels] -- --config configs/passk.yaml [lgen predict options]

Runs ``lgen predict`` in this process and prints, and writes to the file:

* the wall time from the first batch to the end;
* host time per engine phase (admitting a group, a window of decode steps, sampling, a look at
  finished rows, decoding their text, moving to a smaller pool), inclusive of the waits on the GPU
  that a phase's host syncs make;
* the GPU kernels that took the most time.
"""

from __future__ import annotations

import collections
import functools
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from lgen import cli
from lgen.decode import continuous, sampling, steppers, stopping

PHASES = [(continuous.ContinuousEngine, "_admit"), (continuous.ContinuousEngine, "_window"),
          (continuous.ContinuousEngine, "_step"), (continuous.ContinuousEngine, "_collect"),
          (continuous.ContinuousEngine, "_fit"), (steppers.CapturedStep, "_capture"),
          (stopping.StopRules, "finish"), (stopping.StopRules, "advance")]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


HOST: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def _annotated(fn, name):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            with record_function(name):
                return fn(*args, **kwargs)
        finally:
            HOST[name] += time.perf_counter() - start
            CALLS[name] += 1
    return wrapped


def main() -> None:
    if "--" not in sys.argv[1:] or sys.argv[1] == "--":
        sys.exit(__doc__)
    report, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    kernels_too = "--kernels" in sys.argv[2:sys.argv.index("--")]
    for owner, name in PHASES:
        setattr(owner, name, _annotated(getattr(owner, name), f"lgen.{owner.__name__}.{name}"))
    sampling.next_tokens = _annotated(sampling.next_tokens, "lgen.decode.sampling.next_tokens")
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    started: list[float] = []
    generate = continuous.ContinuousEngine.generate

    def first_generate(self, *a, **k):
        if not started:  # profile from the first batch on: loading and converting the model are not generation
            _sync()
            if kernels_too:
                prof.__enter__()
            HOST.clear()
            CALLS.clear()
            started.append(time.perf_counter())
        return generate(self, *a, **k)

    continuous.ContinuousEngine.generate = first_generate
    code = cli.main(["predict", *args])
    _sync()
    wall = time.perf_counter() - started[0]
    lines = [f"lgen predict exited {code}; {wall:.2f} s from the first batch to the end"]
    lines.append("host time per phase (inclusive of its waits on the GPU):")
    lines += [f"  {name:<42} {seconds:7.2f} s  {CALLS[name]:6d} calls" for name, seconds in HOST.most_common()]
    if kernels_too:
        prof.__exit__(None, None, None)
        kernels = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name())
                         for e in prof.profiler.kineto_results.events()
                         if e.device_type() == DeviceType.CUDA and not e.name().startswith("lgen."))
        busy, end = 0, 0
        by_name: collections.Counter[str] = collections.Counter()
        for a, b, name in kernels:
            busy += max(0, b - max(a, end))
            end = max(end, b)
            by_name[name] += b - a
        lines.append(f"GPU busy {busy / 1e9:.2f} s ({busy / 1e9 / wall:.0%} of the wall time under the profiler), "
                     f"{len(kernels)} kernels; most time first:")
        lines += [f"  {ns / 1e9:7.3f} s  {name[:110]}" for name, ns in by_name.most_common(15)]
    text = "\n".join(lines)
    print(text)
    with open(report, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Rows to examples: tokenize each row once and cut it into prompts, as run_gen.py did.

* complete mode (a reference column, or ``mode: complete``): one prompt per row, the text's last
  ``max_window_size`` tokens; rows whose prompt + reference exceed ``block_size - 1`` are dropped.
* strided mode: each row is a long text. The last ``max_new_tokens`` tokens are held back, the rest
  is cut into the fewest near-equal windows of at most ``max_window_size`` tokens; window k's
  reference is window k+1, the last window's reference is the held-back tail. E.g. 10 tokens,
  ``max_window_size=4``, ``max_new_tokens=2``: rest=8 -> windows [0:4] [4:8], references [4:8] [8:10].

Runs as a batched ``datasets`` map (so it is cached); dropped rows come out with a ``drop`` reason.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from lgen.errors import DataError


def make_examples(rows: dict[str, list], indices: list[int], tokenizer, w: Windowing) -> dict[str, list]:
    """Batched ``.map``: rows in, examples out (several per row in strided mode). A null prompt or
    reference (a CSV field left empty, JSON ``null``, a key missing from a JSON line) drops the row;
    the columns are text (:func:`lgen.data.checks.text_columns` checked their types)."""
    tok = tokenizer
    missing = [t is None for t in rows[w.text]]
    texts = ["" if t is None else t for t in rows[w.text]]
    if w.chat:  # the text a chat model sees: the prompt as a user message, the assistant's turn opened
        ids = [[] if gone else tok(_chat(tok, w, t, indices[i]), add_special_tokens=False)["input_ids"]
               for i, (t, gone) in enumerate(zip(texts, missing))]
    else:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {k: [] for k in ("id", "row", "part", "input_ids", "reference", "drop", "truncated")}
    for c in w.keep:
        out[f"keep.{c}"] = []

    def emit(i: int, part: list[int], prompt: list[int], reference: str, drop: str = "",
             truncated: bool = False) -> None:
        out["id"].append(rows[w.id_column][i] if w.id_column else indices[i])
        out["row"].append(indices[i])
        out["part"].append(part)
        out["input_ids"].append(prompt)
        out["reference"].append(reference)
        out["drop"].append(drop)
        out["truncated"].append(truncated)
        for c in w.keep:
            out[f"keep.{c}"].append(rows[c][i])

    block, window, mnt = w.block_size, w.window, w.max_new_tokens
    if w.complete:
        no_ref = [r is None for r in rows[w.reference]] if w.reference else [False] * len(ids)
        refs = ["" if r is None else r for r in rows[w.reference]] if w.reference else [""] * len(ids)
        ref_lens = [len(r) for r in tok(refs, add_special_tokens=False)["input_ids"]] if w.reference else [0] * len(ids)
        for i, toks in enumerate(ids):
            prompt = toks[-window:]
            if missing[i]:
                emit(i, [1, 1], [], refs[i], "null or missing prompt")
            elif no_ref[i]:
                emit(i, [1, 1], [], refs[i], "null or missing reference")
            elif not prompt:
                emit(i, [1, 1], [], refs[i], "empty prompt")
            elif w.chat and len(toks) > window:  # cut from the left, it would lose the template's start
                emit(i, [1, 1], [], refs[i], "chat prompt longer than max_window_size")
            elif len(prompt) + ref_lens[i] > block - 1:
                emit(i, [1, 1], [], refs[i], "prompt + reference > block_size - 1")
            else:
                emit(i, [1, 1], prompt, refs[i], truncated=len(toks) > window)
        return out
    for i, toks in enumerate(ids):
        if missing[i]:
            emit(i, [1, 1], [], "", "null or missing prompt")
            continue
        if len(toks) < window + mnt:
            emit(i, [1, 1], [], "", "shorter than max_window_size + max_new_tokens")
            continue
        rest, tail = toks[:-mnt], toks[-mnt:]
        windows = [a.tolist() for a in np.array_split(np.asarray(rest), math.ceil(len(rest) / window))]
        references = windows[1:] + [tail]
        chosen = range(len(windows))
        if w.subsamples is not None and w.subsamples < len(windows):
            rng = np.random.default_rng([w.seed, indices[i]])
            chosen = sorted(rng.choice(len(windows), w.subsamples, replace=False).tolist())
        decoded = tok.batch_decode([references[k] for k in chosen], skip_special_tokens=False)
        for k, ref in zip(chosen, decoded):
            emit(i, [k + 1, len(windows)], windows[k], ref)
    return out


def _chat(tok, w: Windowing, text: str, row: int) -> str:
    """The chat template applied to one prompt; a template that fails on this row names it (one that
    fails on any conversation was refused by ``GenerationDataModule.connect``)."""
    from jinja2.exceptions import TemplateError

    system = [{"role": "system", "content": w.system}] if w.system is not None else []
    try:
        return tok.apply_chat_template([*system, {"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True, chat_template=w.template)
    except TemplateError as err:
        raise DataError(f"data.chat_template fails on row {row} ({type(err).__name__}: {err}); fix the template "
                        "or that row") from None


@dataclass(frozen=True, kw_only=True)
class Windowing:
    """What ``make_examples`` needs from the settings (hashable, so ``datasets`` can cache the map)."""

    complete: bool
    text: str
    reference: str | None
    id_column: str | None
    keep: tuple[str, ...]
    block_size: int
    window: int
    max_new_tokens: int | str
    subsamples: int | None
    seed: int
    chat: bool = False  # wrap each prompt in the chat template (complete mode)
    template: str | None = None  # a Jinja chat template; None: the tokenizer's own
    system: str | None = None  # a system message before the prompt
    # this module's source: ``datasets`` hashes an importable function by name, so without this a
    # changed ``make_examples`` would reuse examples cached by an older lgen
    code: str = field(default_factory=lambda: _CODE)


_CODE = hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()

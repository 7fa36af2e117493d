"""Bad input fails early, with exit code 2 and a message that names the key and the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lgen.cli import main

ARGS = ["predict", "--model.max_new_tokens", "8", "--data.text_column_name", "prompt", "--data.mode", "complete",
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


def run(capsys, model, data, out, *extra: str) -> tuple[int, str]:
    code = main([*ARGS, "--model.model_name_or_path", str(model), "--data.data_files", str(data),
                 "--output_dir", str(out), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [
    (["--data.text_column_name", "body"], ["data.text_column_name='body'", "['task_id', 'prompt', 'lang']"]),
    (["--data.reference_column_name", "answer", "--data.mode", "auto"], ["data.reference_column_name='answer'"]),
    (["--data.id_column_name", "key"], ["data.id_column_name='key'", "columns"]),
    (["--data.keep_columns", "[nope]"], ["data.keep_columns", "['nope']"]),
    (["--data.keep_columns", "[prompt, id]"], ["data.keep_columns", "['prompt', 'id']", "overwrite record fields"]),
    (["--model.max_new_tokens", "auto"], ["model.max_new_tokens: auto needs data.reference_column_name"]),
    (["--data.mode", "strided", "--data.block_size", "16", "--data.max_window_size", "12"],
     ["data.max_window_size + model.max_new_tokens = 12 + 8 = 20 exceeds data.block_size=16"]),
    (["--data.block_size", "6", "--data.max_window_size", "9"],
     ["data.max_window_size + model.max_new_tokens = 9 + 8 = 17 exceeds data.block_size=6"]),
    (["--data.mode", "strided", "--data.block_size", "40"], ["every row was dropped", "lower data.max_window_size"]),
    (["--model.adapter_name_or_path", "./no/such/adapter"], ["model.adapter_name_or_path='./no/such/adapter'",
                                                             "does not exist"]),
    (["--model.generation_config_file", "/no/gen.json"], ["model.generation_config_file='/no/gen.json'"]),
    (["--data.max_batch_tokens", "0"], ["data.max_batch_tokens must be >= 1 or auto, got 0"]),
    (["--model.generation_kwargs", "{do_sample: true, temperature: 0}"], ["sampling needs temperature > 0, got 0"]),
    (["--model.generation_kwargs", "{max_new_tokens: 5}"], ["set model.max_new_tokens instead of max_new_tokens"]),
    (["--model.generation_kwargs", "{do_sample: true, num_return_sequences: 0}"],
     ["num_return_sequences must be >= 1, got 0"]),
    (["--model.generation_kwargs", "{do_sample: true, num_return_sequences: -2}"],
     ["num_return_sequences must be >= 1, got -2"]),
    (["--model.generation_kwargs", "{do_sample: true, top_p: 2.0}"], ["top_p must be in (0, 1], got 2.0"]),
    (["--model.generation_kwargs", "{do_sample: true, top_k: -3}"], ["top_k must be >= 0", "got -3"]),
    (["--model.generation_kwargs", "{do_sample: true, temperature: hot}"], ["temperature must be a number, got 'hot'"]),
    (["--model.generation_kwargs", "{num_beams: 2, num_return_sequences: 3}"],
     ["num_return_sequences=3 > num_beams=2"]),
    (["--model.generation_kwargs", "{num_return_sequences: 4}"],
     ["num_return_sequences=4 with greedy decoding", "replaces the whole dict, so repeat do_sample"]),
    (["--model.stop_strings", "['']"], ["model.stop_strings: ['']", "empty string"]),
    (["--model.stop_strings", "['x</s>']"], ["model.stop_strings: ['x</s>'] contain special tokens", "eos_token_id"]),
    (["--model.torch_compile", "true", "--model.engine", "generate"],
     ["model.torch_compile", "engine generate", "set torch_compile: false"]),
    (["--model.torch_compile", "true", "--model.cuda_graphs", "false"], ["model.torch_compile", "cuda_graphs: False"]),
    (["--model.torch_compile", "true", "--model.generation_kwargs", "{num_beams: 2}"],
     ["model.torch_compile", "for ['num_beams']"]),
    (["--model.torch_compile", "true", "--trainer.accelerator", "cpu"],
     ["model.torch_compile needs a CUDA device without ZeRO-3"]),
    (["--trainer.limit_predict_batches", "0"], ["trainer.limit_predict_batches=0 is not supported",
                                                "give a smaller data file"]),
    (["--trainer.limit_predict_batches", "0.5"], ["trainer.limit_predict_batches=0.5 is not supported"]),
    (["--model.engine", "compact", "--model.max_new_tokens", "0"],
     ["model.max_new_tokens must be an integer >= 1 or 'auto', got 0"]),
])
def test_bad_settings(capsys, tiny_model, code_jsonl, tmp_path, extra, words):
    code, err = run(capsys, tiny_model, code_jsonl, tmp_path / "out", *extra)
    assert code == 2, err
    for w in words:
        assert w in err
    assert not (tmp_path / "out" / "00001-of-00001.test.jsonl").exists()


def test_missing_model_path(capsys, code_jsonl, tmp_path):
    code, err = run(capsys, tmp_path / "nowhere", code_jsonl, tmp_path / "out")
    assert code == 2 and "model.model_name_or_path=" in err and "does not exist" in err


def test_hub_name_offline(capsys, code_jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, "no-such-org/no-such-model", code_jsonl, tmp_path / "out")
    assert code == 2 and "model.model_name_or_path='no-such-org/no-such-model' is neither a local folder" in err
    assert "nor a model in this machine's Hub cache, and the Hub is offline here" in err


def test_empty_dataset(capsys, tiny_model, tmp_path):
    data = tmp_path / "empty.csv"
    data.write_text("prompt,lang\n")
    code, err = run(capsys, tiny_model, data, tmp_path / "out")
    assert code == 2 and "is empty" in err


def test_non_utf8_file(capsys, tiny_model, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "caf\xe9 {"}\n')
    code, err = run(capsys, tiny_model, data, tmp_path / "out")
    assert code == 2 and "is not UTF-8 (byte 15" in err and "re-encode" in err


def test_missing_data_file(capsys, tiny_model, tmp_path):
    code, err = run(capsys, tiny_model, tmp_path / "nope.jsonl", tmp_path / "out")
    assert code == 2 and "data.data_files" in err and "does not exist" in err


def test_output_dir_is_a_file(capsys, tiny_model, code_jsonl, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    code, err = run(capsys, tiny_model, code_jsonl, target)
    assert code == 2 and "is a file" in err
    code, err = run(capsys, tiny_model, code_jsonl, target / "sub")
    assert code == 2 and "which is a file" in err
    assert target.read_text() == "mine"


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="needs a directory this user cannot write")
def test_output_dir_not_writable(capsys, tiny_model, code_jsonl):
    code, err = run(capsys, tiny_model, code_jsonl, Path("/proc/sys/lgen-out"))
    assert code == 2 and "is not writable" in err


def test_foreign_files_are_refused_and_kept(capsys, tiny_model, code_jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite_output_dir", "true"]):
        code, err = run(capsys, tiny_model, code_jsonl, out, *extra)
        assert code == 2 and "holds files lgen did not write (notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_bug_in_the_decode_loop_keeps_its_traceback(tiny_model, code_jsonl, tmp_path):
    """Only what the user must fix is a one-line error (exit 2); a bug shows where it happened."""
    script = (
        "import sys\n"
        "import lgen.decode.sampling\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('a bug in the decode loop')\n"
        "lgen.decode.sampling.next_tokens = broken\n"
        "from lgen.cli import main\n"
        f"sys.exit(main({ARGS!r} + sys.argv[1:]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "--model.model_name_or_path", str(tiny_model),
                             "--data.data_files", str(code_jsonl), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode not in (0, 2), result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: a bug in the decode loop" in result.stderr and "lgen: error" not in result.stderr


def test_duplicate_ids_are_refused_before_the_model_loads(capsys, tiny_model, code_jsonl, tmp_path, monkeypatch):
    from lgen import module

    def never(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(module.AutoModelForCausalLM, "from_pretrained", never)
    code, err = run(capsys, tiny_model, code_jsonl, tmp_path / "out", "--data.id_column_name", "lang")
    assert code == 2
    assert "data.id_column_name='lang' does not identify the rows: 2 ids appear more than once" in err
    assert '"rust" (5 times)' in err and '"c" (5 times)' in err and "leave data.id_column_name unset" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_jsonl_file(capsys, tiny_model, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_bytes(b"")
    code, err = run(capsys, tiny_model, data, tmp_path / "out")
    assert code == 2
    assert err.strip() == f"lgen: error: the dataset in data.data_files=['{data}'] is empty: nothing to generate"


def test_malformed_jsonl_names_the_file_and_line(capsys, tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a {"}\n{"prompt": "b {"\n{"prompt": "c {"}\n')
    code, err = run(capsys, tiny_model, data, tmp_path / "out")
    assert code == 2 and f"data.data_files: {data} line 2 is not valid JSON" in err
    assert err.count("\n") == 1  # one line, nothing from datasets before it


def test_a_missing_model_folder_fails_at_once(tiny_model, code_jsonl, tmp_path):
    """A relative path that does not exist looks like a Hub name; with no cached copy and no Hub to
    ask, lgen says so at once, naming both, without the Hub's retry warnings."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lgen", *ARGS, "--model.model_name_or_path", "checkpoints/my-model",
                             "--data.data_files", str(code_jsonl), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "model.model_name_or_path='checkpoints/my-model' is neither a local folder" in result.stderr
    assert f"({tmp_path}/checkpoints/my-model does not exist)" in result.stderr
    assert "Hub cache, and the Hub cannot be reached" in result.stderr
    assert seconds < 20, seconds  # imports included; no retries


def test_strided_text_hints_at_sample_by(capsys, tiny_model, tmp_path):
    """A .txt file is read a line a row: wrapped paragraphs are too short for strided windows."""
    text = tmp_path / "book.txt"
    paragraph = "\n".join("int add(int a, int b) { return a + b; }" for _ in range(6))
    text.write_text(paragraph + "\n\n" + paragraph + "\n")
    args = ["--data.mode", "strided", "--data.text_column_name", "text", "--data.max_window_size", "24",
            "--data.block_size", "64"]
    code, err = run(capsys, tiny_model, text, tmp_path / "lines", *args)
    assert code == 2 and "lower data.max_window_size" in err and "set data.sample_by: paragraph" in err
    assert "raise data.block_size" not in err
    code, err = run(capsys, tiny_model, text, tmp_path / "paragraphs", *args, "--data.sample_by", "paragraph")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "paragraphs" / "00001-of-00001.test.jsonl").open()]
    assert sorted({r["id"] for r in records}) == [0, 1] and all(r["part"][1] > 1 for r in records)


def test_an_unserialisable_keep_column_keeps_the_old_records(capsys, tiny_model, code_jsonl, tmp_path):
    """A column JSON cannot hold is refused in setup, before overwrite_output_dir empties the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    code, err = run(capsys, tiny_model, code_jsonl, out)
    assert code == 0, err
    shard = out / "00001-of-00001.test.jsonl"
    before = shard.read_bytes()
    data = tmp_path / "blobs.parquet"
    pq.write_table(pa.table({"prompt": ["int f() {"], "blob": pa.array([b"\x89PNG"], pa.binary())}), data)
    code, err = run(capsys, tiny_model, data, out, "--data.keep_columns", "[blob]", "--overwrite_output_dir", "true")
    assert code == 2, err
    assert "data.keep_columns: column 'blob' holds bytes values (Value('binary'); row 0)" in err
    assert "leave it out of data.keep_columns" in err and "Traceback" not in err
    assert shard.read_bytes() == before


def test_a_gzipped_jsonl_generates(capsys, tiny_model, code_jsonl, tmp_path):
    import gzip

    data = tmp_path / "prompts.jsonl.gz"
    data.write_bytes(gzip.compress(code_jsonl.read_bytes()))
    for extra in ([], ["--data.dataset_name", "json"]):
        out = tmp_path / f"out{len(extra)}"
        code, err = run(capsys, tiny_model, data, out, "--data.id_column_name", "task_id", *extra)
        assert code == 0, err
        records = [json.loads(line) for line in (out / "00001-of-00001.test.jsonl").open()]
        assert sorted(r["id"] for r in records) == sorted(json.loads(line)["task_id"] for line in code_jsonl.open())


def test_null_prompts_are_not_generated(capsys, tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "int f() {"}\n{"prompt": null}\n{"lang": "c"}\n')
    code, err = run(capsys, tiny_model, data, tmp_path / "out")
    assert code == 0, err
    assert "dropped 2 of 3 rows: null or missing prompt (rows 1, 2)" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "00001-of-00001.test.jsonl").open()]
    assert [(r["id"], r["prompt"]) for r in records] == [(0, "int f() {")]


@pytest.mark.parametrize("extra,message", [
    (["--data.dataset_split", "val-2"], "lgen: error: data.dataset_split='val-2' is not a split name"),
    (["--data.subsamples", "2"], "lgen: error: data.subsamples=2 picks strided windows"),
    (["--data.max_batch_tokens", "9"], "lgen: error: data.max_batch_tokens=9 cannot hold one row: the longest prompt "
                                       "+ model.max_new_tokens (19 + 8) = 27 cache tokens; set it to at least 27"),
    (["--data.chat_template", "BROKEN"],
     "lgen: error: data.chat_template='BROKEN', line 2: the template does not parse (unexpected '}')"),
])
def test_data_settings_that_cannot_work_are_one_line(capsys, tiny_model, code_jsonl, tmp_path, extra, message):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    extra = [str(broken) if e == "BROKEN" else e for e in extra]
    code, err = run(capsys, tiny_model, code_jsonl, tmp_path / "out", *extra)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(message.replace("BROKEN", str(broken))), err
    assert "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the conversion needs gguf")
def test_an_unwritable_lgen_cache_is_named_before_the_conversion(capsys, code_jsonl, tmp_path, monkeypatch):
    from lgen.hf import models

    monkeypatch.setitem(models.ALIASES, "tiny-gguf", ("lgen", "__init__.py"))  # a file that exists
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LGEN_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made, even by root
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", None)  # a conversion would fail
    code = main([*ARGS, "--model.model_name_or_path", "tiny-gguf", "--data.data_files", str(code_jsonl),
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"is converted once into the lgen cache, and {tmp_path / 'a-file' / 'cache' / 'models'}" in err
    assert "set LGEN_CACHE to a writable folder" in err


def test_a_recursive_pattern_reads_every_folder(capsys, tiny_model, tmp_path):
    for folder, n in (("a/x", 2), ("b/c", 1)):  # two folders down: a one-folder glob finds nothing
        (tmp_path / "dd" / folder).mkdir(parents=True)
        (tmp_path / "dd" / folder / "p.jsonl").write_text(
            "".join(json.dumps({"prompt": f"int {folder[0]}{i}() {{"}) + "\n" for i in range(n)))
    code, err = run(capsys, tiny_model, str(tmp_path / "dd" / "**" / "*.jsonl"), tmp_path / "out")
    assert code == 0, err
    assert len((tmp_path / "out" / "00001-of-00001.test.jsonl").read_text().splitlines()) == 3


def test_an_output_dir_the_data_pattern_reads_is_refused(capsys, tiny_model, tmp_path):
    (tmp_path / "dd" / "a").mkdir(parents=True)
    (tmp_path / "dd" / "a" / "p.jsonl").write_text(json.dumps({"prompt": "int f() {"}) + "\n")
    pattern, out = str(tmp_path / "dd" / "*" / "*.jsonl"), tmp_path / "dd" / "out"
    code, err = run(capsys, tiny_model, pattern, out)
    assert code == 2
    assert err.strip() == (f"lgen: error: output_dir={str(out)!r} is where data.data_files={pattern!r} reads: lgen's "
                           "own records (00001-of-00001.test.jsonl) would be read back as prompts; put output_dir "
                           "elsewhere or narrow the pattern")
    assert run(capsys, tiny_model, pattern, tmp_path / "elsewhere")[0] == 0


@pytest.mark.parametrize("extra,message", [
    (["--trainer.logger", "CSVLogger"],
     "lgen: error: trainer.logger.save_dir is required: CSVLogger needs it (--trainer.logger.save_dir VALUE, or in a "
     "config)"),
    (["--trainer.callbacks+", "lightning.pytorch.callbacks.Timer"],
     "lgen: error: trainer.callbacks: lightning.pytorch.callbacks.Timer has a default (<Interval.step: 'step'>) that "
     "the config lgen keeps cannot hold; give the class's init_args in a config file (e.g. interval: step)"),
    pytest.param(["--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "TMP"],
                 "lgen: error: trainer.logger: lightning.pytorch.loggers.TensorBoardLogger needs a package that is not "
                 "installed (Neither `tensorboard` nor `tensorboardX` is available.",
                 marks=pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None
                                          or importlib.util.find_spec("tensorboardX") is not None,
                                          reason="tensorboard is installed")),
])
def test_a_trainer_class_that_cannot_be_made_is_one_line(capsys, tiny_model, code_jsonl, tmp_path, extra, message):
    extra = [str(tmp_path / "logs") if e == "TMP" else e for e in extra]
    code, err = run(capsys, tiny_model, code_jsonl, tmp_path / "out", *extra)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(message), err
    assert "Traceback" not in err


def test_ids_that_differ_only_in_type_are_explained(capsys, tiny_model, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    code, err = run(capsys, tiny_model, data, tmp_path / "out", "--data.id_column_name", "id")
    assert code == 2
    assert 'the column mixes value types, which datasets reads as JSON values: 1 and "1" become the same id' in err


def test_merge_refuses_a_split_that_is_a_path(capsys, tiny_model, code_jsonl, tmp_path):
    assert run(capsys, tiny_model, code_jsonl, tmp_path / "out")[0] == 0
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(tmp_path / "out"), "--split", "../x"])
    assert exit_.value.code == 2
    assert "--split '../x' is not a split name" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_help_into_a_closed_pipe_ends_quietly(monkeypatch):
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["predict", "--help"]) == 0

"""The same command on a complete directory ends at once, from the receipt, without the heavy
imports; any change to what it read or wrote goes the normal way."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest
from conftest import base_args, lgen, read

from lgen import cli, options
from lgen.output import receipt

CPU = ["--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]  # what conftest.lgen adds


def no_op(args: list[str]):
    """What the CLI's short way finds for ``lgen predict ARGS`` (as conftest.lgen runs it)."""
    argv = [*args, *CPU]
    return receipt.nothing_to_do(argv, options.config_files(argv), options.output_dir(argv))


class NormalWay(Exception):
    """Raised where the normal way (``predict_main``) begins."""


@pytest.fixture
def done(tiny_model, code_jsonl, tmp_path):
    """A complete directory, and the arguments that made it."""
    args = base_args(tiny_model, code_jsonl, tmp_path / "out")
    assert lgen(*args) == 0
    assert (tmp_path / "out" / receipt.NAME).is_file()
    return args, tmp_path / "out"


@pytest.fixture
def normal_way(monkeypatch):
    def refuse(args):
        raise NormalWay

    monkeypatch.setattr(cli, "predict_main", refuse)


def test_the_same_command_again_ends_at_once(done, normal_way, capsys):
    args, out = done
    capsys.readouterr()
    assert lgen(*args) == 0
    err = capsys.readouterr().err
    assert f"nothing to generate: all 10 records are in {out}" in err
    assert f"lgen: 10 of 10 records in {out}" in err


def test_it_imports_neither_lightning_nor_transformers(done):
    args, out = done
    code = ("import sys; from lgen.cli import main; "
            f"code = main(['predict', *{args!r}, '--trainer.enable_progress_bar', 'false', "
            "'--trainer.accelerator', 'cpu']); "
            "heavy = [m for m in ('torch', 'lightning', 'transformers', 'datasets') if m in sys.modules]; "
            "print(code, heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "0 []", result.stderr[-2000:]


@pytest.mark.parametrize("change", ["another option", "data edited", "record deleted", "model file added",
                                    "receipt deleted", "run in progress"])
def test_any_change_goes_the_normal_way(done, normal_way, code_jsonl, tiny_model, change):
    args, out = done
    shard = out / "00001-of-00001.test.jsonl"
    lock = None
    if change == "another option":
        args = [*args, "--data.per_device_batch_size", "2"]
    elif change == "data edited":  # the same size, at once: only the content tells
        code_jsonl.write_text(code_jsonl.read_text().replace("int add", "int ad2"))
    elif change == "record deleted":
        shard.write_text("".join(shard.read_text().splitlines(keepends=True)[1:]))
    elif change == "model file added":
        (tiny_model / "notes.txt").write_text("x")
    elif change == "receipt deleted":
        (out / receipt.NAME).unlink()
    else:
        lock = os.open(out / "lgen.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(NormalWay):
            lgen(*args)
    finally:
        if change == "model file added":
            (tiny_model / "notes.txt").unlink()
        if lock is not None:
            os.close(lock)


def test_the_normal_way_then_writes_it_again(done, code_jsonl, capsys):
    """A deleted record is generated again, and the receipt describes the directory after."""
    args, out = done
    shard = out / "00001-of-00001.test.jsonl"
    before = read(out)
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[1:]))
    assert lgen(*args) == 0
    assert sorted(map(json.dumps, read(out))) == sorted(map(json.dumps, before))
    assert no_op(args) is not None


def test_no_receipt_for_an_overwrite_or_an_input_it_cannot_check(tiny_model, code_jsonl, tmp_path):
    out = tmp_path / "out"
    assert lgen(*base_args(tiny_model, code_jsonl, out, "--overwrite_output_dir", "true")) == 0
    assert not (out / receipt.NAME).exists()  # the same command overwrites again: it is not a no-op
    assert receipt.inputs({"model.model_name_or_path": "org/model-on-the-hub"}, {}) is None
    assert receipt.inputs({"data.data_files": str(tmp_path / "*.none")}, {}) is None
    assert receipt.inputs({"data.dataset_name": "json", "data.data_files": str(code_jsonl),
                           "data.chat_template": "{{ messages }}"}, {}) is not None


def test_a_new_file_matching_the_data_glob_goes_the_normal_way(tiny_model, code_jsonl, tmp_path, monkeypatch):
    args = base_args(tiny_model, code_jsonl, tmp_path / "out")
    args[args.index(str(code_jsonl))] = str(code_jsonl.parent / "prompts*.jsonl")
    assert lgen(*args) == 0
    assert no_op(args) is not None
    (code_jsonl.parent / "prompts-2.jsonl").write_text(code_jsonl.read_text().replace('"t/', '"u/'))
    assert no_op(args) is None


@pytest.mark.parametrize("order", ["config last", "command line last"])
def test_output_dir_is_read_as_the_cli_reads_it(tmp_path, capsys, order, monkeypatch):
    """options.output_dir (the short way's) agrees with the parser's: the last value wins, a config
    file's relative to its folder, the command line's to the current directory."""
    import yaml

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "task.yaml").write_text("output_dir: ../out/from-config\nmodel:\n  model_name_or_path: x\n"
                                      "  max_new_tokens: 4\n")
    monkeypatch.chdir(tmp_path)
    pair = [["--output_dir", "~/from-line"], ["--config", str(folder / "task.yaml")]]
    argv = [*pair[1], *pair[0]] if order == "command line last" else [*pair[0], *pair[1]]
    from jsonargparse import Namespace

    from lgen.predict import resolve_config_paths

    with pytest.raises(SystemExit):  # the parser's value: the last one given
        cli.main(["predict", *argv, "--print_config"])
    parsed = Namespace(output_dir=yaml.safe_load(capsys.readouterr().out)["output_dir"])
    resolve_config_paths(parsed, argv)  # then read as the CLI reads it
    assert options.output_dir(argv) == parsed.output_dir
    assert parsed.output_dir == (os.path.expanduser("~/from-line") if order == "command line last"
                                 else str(tmp_path / "out" / "from-config"))

"""The command line as a user meets it: help, one-line errors for mistakes, quiet runs, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import base_args, lgen, prompts_file

from lgen.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str], code: int = 2) -> str:
    """Run ``lgen``; it must fail with ``code`` and print exactly one line, the error."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lgen: error: "), err
    return err


def test_lgen_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: lgen <command>" in out and "Lightning Trainer command line tool" not in out
    for command in ("predict", "merge"):
        assert f"\n  {command} " in out
    assert main([]) == 2  # no command: the same usage, as an error
    assert "usage: lgen <command>" in capsys.readouterr().out


def test_unknown_command(capsys):
    err = one_line_error(capsys, ["fit", "--help"])
    assert "unknown command 'fit'; the commands are predict, merge" in err


def test_predict_help_shows_what_prediction_uses(capsys):
    assert main(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--model.max_new_tokens", "--data.per_device_batch_size", "--output_dir", "--trainer.accelerator",
                "--trainer.devices", "--trainer.num_nodes", "--trainer.strategy", "--trainer.precision",
                "--trainer.limit_predict_batches", "--trainer.callbacks", "--trainer.logger"):
        assert key in out, key
    for key in ("max_epochs", "gradient_clip_val", "ckpt_path", "return_predictions", "accumulate_grad_batches",
                "num_sanity_val_steps", "use_distributed_sampler"):
        assert key not in out, key
    assert len(out.splitlines()) < 120


def test_missing_max_new_tokens_says_what_it_takes(capsys, tiny_model, code_jsonl, tmp_path):
    err = one_line_error(capsys, ["predict", "--model.model_name_or_path", str(tiny_model), "--data.data_files",
                                  str(code_jsonl), "--output_dir", str(tmp_path / "o")])
    assert err == "lgen: error: model.max_new_tokens is required: an integer >= 1, or auto"
    err = one_line_error(capsys, ["predict", "--model.model_name_or_path", str(tiny_model),
                                  "--model.max_new_tokens", "many", "--data.data_files", str(code_jsonl),
                                  "--output_dir", str(tmp_path / "o")])
    assert err == "lgen: error: model.max_new_tokens='many' is not valid: expected an integer >= 1, or auto"
    err = one_line_error(capsys, ["predict", "--model.max_new_tokens", "4", "--data.data_files", str(code_jsonl),
                                  "--output_dir", str(tmp_path / "o")])
    assert err.startswith("lgen: error: model.model_name_or_path is required: a local model folder")


def test_no_abbreviations_and_close_keys_for_a_typo(capsys, tiny_model, code_jsonl, tmp_path):
    args = ["predict", *base_args(tiny_model, code_jsonl, tmp_path / "o")]
    err = one_line_error(capsys, [*args, "--model.max_new_token", "8"])
    assert "unknown key model.max_new_token; did you mean model.max_new_tokens?" in err
    err = one_line_error(capsys, [*args, "--data.per_device_batch", "8"])
    assert "unknown key data.per_device_batch; did you mean data.per_device_batch_size?" in err
    assert not (tmp_path / "o").exists()


def test_config_file_mistakes_name_the_key_or_the_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"model_name_or_path": "x", "max_new_tokens": 4, "use_brace_match": True},
                               "data": {"data_files": "d.jsonl"}, "output_dir": "o"}))
    err = one_line_error(capsys, ["predict", "--config", str(cfg)])
    assert "unknown key model.use_brace_match; did you mean model.use_brace_matching?" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  model_name_or_path: x\n  max_new_tokens: [4\n")
    err = one_line_error(capsys, ["predict", "--config", str(cfg), "--config", str(broken)])
    assert f"{broken} is not valid YAML" in err and "line 4" in err


@pytest.mark.parametrize("text,words", [
    (None, "no such file"),
    ("", "is empty; give keys such as output_dir"),
    ("- model\n- data\n", "holds a YAML list, not a mapping of keys"),
    ("seed_everythin: 1\n", "unknown key seed_everythin; did you mean seed_everything?"),
    ("modle:\n  max_new_tokens: 4\n", "unknown key modle; did you mean model?"),
    ("model:\n  max_new_tokns: 4\n", "unknown key model.max_new_tokns; did you mean model.max_new_tokens?"),
    ("data:\n  per_device_batch_siz: 4\n", "did you mean data.per_device_batch_size?"),
])
def test_a_config_file_that_cannot_work_is_named_with_its_mistake(capsys, tmp_path, text, words):
    cfg = tmp_path / "task.yaml"
    if text is not None:
        cfg.write_text(text)
    err = one_line_error(capsys, ["predict", "--config", str(cfg), "--output_dir", str(tmp_path / "o")])
    assert str(cfg) in err and words in err, err
    assert not (tmp_path / "o").exists()


def test_a_config_directory_is_refused_before_lightning_is_imported(tmp_path):
    code = ("import sys; from lgen.cli import main; code = main(['predict', '--config', sys.argv[1]]); "
            "print(code, 'lightning' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert f"--config {tmp_path} is a directory; give a YAML file" in result.stderr


def test_help_and_an_unknown_key_need_no_heavy_import(tmp_path):
    """The keys are read from the sources (lgen.options), not by importing lgen.data or lgen.module."""
    cfg = tmp_path / "task.yaml"
    cfg.write_text("model:\n  max_new_tokns: 4\n")
    code = ("import sys, contextlib, io; from lgen.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['predict', '--help'])\n"
            "code = main(['predict', '--config', sys.argv[1]])\n"
            "print(code, sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []", result.stderr
    assert "did you mean model.max_new_tokens?" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU-only config runs here")
def test_gpu_config_without_a_gpu_says_how_to_run_on_cpus(capsys, tiny_model, code_jsonl, tmp_path):
    err = one_line_error(capsys, ["predict", *base_args(tiny_model, code_jsonl, tmp_path / "o"),
                                  "--config", str(ROOT / "configs/ddp.yaml")])
    assert "--trainer.accelerator cpu --trainer.devices N" in err
    assert not (tmp_path / "o").exists()


def test_a_clean_run_prints_the_bar_and_the_summary_only(tiny_model, tmp_path):
    """No device lines, tips, seed notes or deprecation warnings: a progress bar (which is closed
    before the summary), where the records went, and what the run did."""
    data = prompts_file(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "lgen", "predict", *base_args(tiny_model, data, out),
                             "--data.keep_columns", "null", "--trainer.accelerator", "cpu"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS=""))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == ""
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    bar = [line for line in lines if line.startswith("generating")]
    rest = [line for line in lines if not line.startswith("generating")]
    assert bar and len(rest) == 2, lines
    assert rest[0].startswith(f"lgen: 10 of 10 records in {out}: "), lines
    assert rest[1].startswith("lgen: this run: 10 records, ") and rest[1].endswith(f"details in {out}/summary.json")
    # the bar counts records as they finish, with the tokens they took (not one batch late)
    tokens = json.loads((out / "summary.json").read_text())["generated_tokens"]
    assert "10/10" in bar[-1] and f"tokens={tokens}" in bar[-1], bar
    assert "0/?" not in result.stderr


def test_merge_of_a_missing_directory(capsys, tmp_path):
    err = one_line_error(capsys, ["merge", str(tmp_path / "nowhere")])
    assert err == f"lgen: error: {tmp_path / 'nowhere'} does not exist"


def test_progress_bar_can_be_turned_off(tiny_model, code_jsonl, tmp_path, capsys):
    assert lgen(*base_args(tiny_model, code_jsonl, tmp_path / "o")) == 0  # lgen() turns it off
    assert "generating" not in capsys.readouterr().err

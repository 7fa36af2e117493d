from __future__ import annotations

import json
import re

import pytest
from conftest import TEMPLATE, make_word_tokenizer

from lgen.data import GenerationDataModule
from lgen.data.lengths import Lengths
from lgen.errors import ConfigError, DataError


def words(a: int, b: int) -> str:
    return " ".join(f"w{i}" for i in range(a, b))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("words"))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def module(tok, path, **kw) -> GenerationDataModule:
    dm = GenerationDataModule(data_files=path, **kw)
    dm.connect(tok)
    dm.setup("predict")
    return dm


def view(dm):
    return [(ex["id"], ex["part"], tok_text(dm, ex["input_ids"]), ex["reference"]) for ex in dm.examples]


def tok_text(dm, ids):
    return dm.tokenizer.decode(ids)


def test_strided_windows_and_references(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 10)}, {"text": words(0, 11)}, {"text": words(0, 5)}])
    dm = module(tok, path, block_size=6, max_window_size=4, max_new_tokens=2)
    assert view(dm) == [
        (0, [1, 2], "w0 w1 w2 w3", "w4 w5 w6 w7"),
        (0, [2, 2], "w4 w5 w6 w7", "w8 w9"),
        (1, [1, 3], "w0 w1 w2", "w3 w4 w5"),
        (1, [2, 3], "w3 w4 w5", "w6 w7 w8"),
        (1, [3, 3], "w6 w7 w8", "w9 w10"),
    ]
    assert dm.stats["rows_dropped"] == {"shorter than max_window_size + max_new_tokens": 1}
    assert dm.stats["rows_read"] == 3


def test_strided_default_window_is_block_minus_new_tokens(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 12)}])
    dm = module(tok, path, block_size=7, max_new_tokens=3)  # window 4; rest 9 -> 3 windows of 3
    assert [ex["part"] for ex in dm.examples] == [[1, 3], [2, 3], [3, 3]]
    assert dm.examples[-1]["reference"] == "w9 w10 w11"


def test_subsamples_are_seeded_and_in_order(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 40)}, {"text": words(0, 40)}])
    a = module(tok, path, block_size=6, max_window_size=4, max_new_tokens=2, subsamples=3, seed=7)
    b = module(tok, path, block_size=6, max_window_size=4, max_new_tokens=2, subsamples=3, seed=7)
    assert [ex["part"] for ex in a.examples] == [ex["part"] for ex in b.examples]
    for row in (0, 1):
        parts = [ex["part"][0] for ex in a.examples if ex["id"] == row]
        assert len(parts) == 3 and parts == sorted(parts)
        assert all(ex["part"][1] == 10 for ex in a.examples)
    others = {tuple(ex["part"]) for s in range(8) for ex in
              module(tok, path, block_size=6, max_window_size=4, max_new_tokens=2, subsamples=3, seed=s).examples}
    assert len(others) > 3  # the seed matters


def test_complete_mode_truncates_left_and_drops_long_rows(tok, tmp_path):
    rows = [
        {"id": "a", "prompt": words(0, 5), "ref": words(5, 7), "lang": "x"},  # 4 + 2 = 6 <= 7: kept, truncated
        {"id": "b", "prompt": words(0, 2), "ref": words(2, 8), "lang": "y"},  # 2 + 6 = 8 > 7: dropped
        {"id": "c", "prompt": words(0, 2), "ref": words(2, 3), "lang": "z"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = module(tok, path, block_size=8, max_window_size=4, max_new_tokens="auto", text_column_name="prompt",
                reference_column_name="ref", id_column_name="id", keep_columns=["lang"])
    assert view(dm) == [("a", [1, 1], "w1 w2 w3 w4", "w5 w6"), ("c", [1, 1], "w0 w1", "w2")]
    assert [ex["keep"] for ex in dm.examples] == [{"lang": "x"}, {"lang": "z"}]
    assert dm.stats["rows_dropped"] == {"prompt + reference > block_size - 1": 1}
    # auto: each batch gets block_size - its longest prompt
    batch = dm.collate([(False, dm.examples[0], None), (False, dm.examples[1], None)])
    assert batch.max_new_tokens == 8 - 4
    assert batch.input_ids.tolist() == [tok.convert_tokens_to_ids(["w1", "w2", "w3", "w4"]),
                                           [tok.pad_token_id] * 2 + tok.convert_tokens_to_ids(["w0", "w1"])]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    alone = dm.collate([(False, dm.examples[1], None)])
    assert alone.max_new_tokens == 8 - 2


def test_complete_mode_without_reference(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 3)}, {"text": words(3, 9)}])
    dm = module(tok, path, mode="complete", block_size=10, max_new_tokens=6)
    assert view(dm) == [(0, [1, 1], "w0 w1 w2", ""), (1, [1, 1], "w5 w6 w7 w8", "")]


def test_plan_is_sorted_capped_and_dealt_whole(tok, tmp_path):
    rows = [{"text": words(0, n)} for n in (2, 5, 3, 4, 1, 5, 2)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = module(tok, path, mode="complete", block_size=16, max_new_tokens=3, per_device_batch_size=3)
    assert dm.plan() == [[1, 5, 3], [2, 0, 6], [4]]
    dm.batch_tokens = 16  # (rows) x (longest + 3) <= 16
    assert dm.plan() == [[1, 5], [3, 2], [0, 6, 4]]
    assert dm.rank_batches(0, 2) == [[1, 5], [0, 6, 4]]
    assert dm.rank_batches(1, 2) == [[3, 2]]
    assert dm.rank_batches(3, 4) == [[-1]]
    dm.lockstep = True  # ZeRO-3 ranks: the same number of batches each
    assert dm.rank_batches(1, 2) == [[3, 2], [-1]]
    dm.lockstep = False
    dm.samples = 2  # each prompt's samples take cache room too: rows x 2 x (longest + 3) <= 16
    assert dm.plan() == [[1], [5], [3], [2], [0], [6], [4]]
    dm.samples, dm.max_new_tokens, dm.lengths = 1, "auto", Lengths(8, 8, "auto")  # auto fills block_size: rows x 8
    assert dm.plan() == [[1, 5], [3, 2], [0, 6], [4]]
    dm.max_new_tokens, dm.lengths = 3, Lengths(16, 13, 3)
    dm.sort_by_length = False
    dm.batch_tokens = None
    assert dm.plan() == [[0, 1, 2], [3, 4, 5], [6]]


def test_done_examples_are_skipped(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 3)}, {"text": words(3, 9)}])
    dm = GenerationDataModule(data_files=path, mode="complete", block_size=10, max_new_tokens=6)
    dm.connect(tok)
    dm.skip({("0", (1, 1))})
    dm.setup()
    assert [ex["id"] for ex in dm.examples] == [0, 1]  # the split, as a complete output holds it
    assert [ex["id"] for ex in dm.todo] == [1] and dm.plan() == [[0]]  # what this run generates
    assert dm.run_stats()["examples_skipped_done"] == 1


@pytest.mark.parametrize("kw,words_in_message", [
    ({"text_column_name": "nope"}, ["data.text_column_name='nope'", "['text', 'other']"]),
    ({"id_column_name": "nope"}, ["data.id_column_name='nope'", "columns"]),
    ({"keep_columns": ["x"]}, ["data.keep_columns", "['x']"]),
    ({"reference_column_name": "nope", "max_new_tokens": 2, "block_size": 9}, ["data.reference_column_name='nope'"]),
])
def test_missing_columns_name_the_key_and_list_columns(tok, tmp_path, kw, words_in_message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 30), "other": 1}])
    kw = {"block_size": 8, "max_new_tokens": 2} | kw
    with pytest.raises(ConfigError) as err:
        module(tok, path, **kw)
    for w in words_in_message:
        assert w in str(err.value)


@pytest.mark.parametrize("kw,message", [
    ({"max_new_tokens": "auto"}, "model.max_new_tokens: auto needs data.reference_column_name"),
    ({"max_new_tokens": 4, "max_window_size": 6, "block_size": 8},
     "data.max_window_size + model.max_new_tokens = 6 + 4 = 10 exceeds data.block_size=8"),
    ({"max_new_tokens": None}, "model.max_new_tokens must be set"),
    ({"mode": "complete", "max_new_tokens": 4, "max_window_size": 6, "block_size": 8},
     "data.max_window_size + model.max_new_tokens = 6 + 4 = 10 exceeds data.block_size=8; lower one of them or "
     "raise data.block_size"),
    ({"reference_column_name": "r", "max_new_tokens": "auto", "max_window_size": 9, "block_size": 8},
     "data.max_window_size=9 exceeds data.block_size=8: a prompt would not fit; lower data.max_window_size"),
    ({"mode": "complete", "max_new_tokens": 2, "subsamples": 3},
     "data.subsamples=3 picks strided windows, and complete mode has one prompt per row; unset data.subsamples"),
    ({"reference_column_name": "r", "max_new_tokens": "auto", "subsamples": 1}, "data.subsamples=1 picks strided"),
])
def test_length_settings_are_checked_before_loading(tok, kw, message):
    dm = GenerationDataModule(data_files="never-read.jsonl", **kw)
    with pytest.raises(ConfigError, match=re.escape(message)):
        dm.connect(tok)


@pytest.mark.parametrize("kw,window", [
    ({"mode": "complete", "max_new_tokens": 3, "block_size": 8}, 5),  # the default window fills the block
    ({"mode": "complete", "max_new_tokens": 3, "block_size": 8, "max_window_size": 5}, 5),
    ({"reference_column_name": "r", "max_new_tokens": "auto", "block_size": 8, "max_window_size": 8}, 8),
    ({"max_new_tokens": 3, "block_size": 8}, 5),
])
def test_a_window_that_fits_the_block_is_accepted(tok, kw, window):
    dm = GenerationDataModule(data_files="never-read.jsonl", **kw)
    dm.connect(tok)
    assert dm.resolved_window == window


@pytest.mark.parametrize("kw,samples,message", [
    ({"max_new_tokens": 3, "max_batch_tokens": 7}, 1,
     "data.max_batch_tokens=7 cannot hold one row: the longest prompt + model.max_new_tokens (5 + 3) = 8 cache "
     "tokens; set it to at least 8, or auto"),
    ({"max_new_tokens": 3, "max_batch_tokens": 15}, 2,
     "data.max_batch_tokens=15 cannot hold one row: the longest prompt + model.max_new_tokens (5 + 3) x 2 samples "
     "= 16 cache tokens; set it to at least 16, or auto"),
    ({"max_new_tokens": "auto", "reference_column_name": "ref", "max_batch_tokens": 29}, 3,
     "data.max_batch_tokens=29 cannot hold one row: data.block_size (10, with model.max_new_tokens: auto) x 3 "
     "samples = 30 cache tokens; set it to at least 30, or auto"),
])
def test_max_batch_tokens_must_hold_one_row(tok, tmp_path, kw, samples, message):
    rows = [{"text": words(0, 2), "ref": "w0"}, {"text": words(0, 5), "ref": "w0"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = GenerationDataModule(data_files=path, mode="complete", block_size=10, **kw)
    dm.connect(tok, samples=samples)
    with pytest.raises(ConfigError) as err:
        dm.setup()
    assert str(err.value) == message
    need = int(message.split("at least ")[1].split(",")[0])
    dm = GenerationDataModule(data_files=path, mode="complete", block_size=10, **kw | {"max_batch_tokens": need})
    dm.connect(tok, samples=samples)
    dm.setup()
    assert len(dm.examples) == 2


def test_all_rows_dropped_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 3)}])
    with pytest.raises(DataError, match="every row was dropped"):
        module(tok, path, block_size=8, max_new_tokens=2)


def test_saved_dataset_folder_and_csv(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": [words(0, 3), words(3, 5)], "k": [1, 2]})
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = GenerationDataModule(dataset_name=str(tmp_path / "saved"), mode="complete", block_size=10, max_new_tokens=2)
    dm.connect(tok)
    dm.setup()
    assert [tok_text(dm, ex["input_ids"]) for ex in dm.examples] == ["w0 w1 w2", "w3 w4"]
    (tmp_path / "d.csv").write_text("text,k\n" + words(0, 2) + ",1\n")
    assert view(module(tok, str(tmp_path / "d.csv"), mode="complete", block_size=10, max_new_tokens=2)) == [
        (0, [1, 1], "w0 w1", "")]


def test_strided_parts_are_numbered_from_one(tok, tmp_path):
    """lgen numbers windows from 1, as ``seq`` and complete mode's ``[1, 1]``; run_gen.py numbered
    strided windows from 0 (docs/porting.md)."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 14)}])
    dm = module(tok, path, block_size=6, max_window_size=4, max_new_tokens=2)
    assert [ex["part"] for ex in dm.examples] == [[1, 3], [2, 3], [3, 3]]


@pytest.mark.parametrize("system", [None, "w7 w8"])
def test_chat_template_wraps_each_prompt_exactly(tok, tmp_path, system):
    """The prompt the model sees is apply_chat_template of the row as a user message (after a
    system message), the assistant's turn opened; the dataset's text stays in meta.prompt_text."""
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    rows = [{"text": words(0, 3)}, {"text": words(3, 5)}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = module(tok, path, mode="complete", block_size=40, max_new_tokens=4, chat_template=str(template),
                system_prompt=system)
    for ex, row in zip(dm.examples, rows):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": row["text"]})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, chat_template=TEMPLATE)
        assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert ex["meta"]["prompt_text"] == row["text"]
    assert tok.decode(dm.examples[0]["input_ids"]).startswith("<s>")
    # "<s> user w0 w1 w2 </s> <s> assistant" is 8 tokens, over a window of 11 - 4: dropped, not cut from the left
    short = module(tok, path, mode="complete", block_size=11, max_new_tokens=4, chat_template=str(template))
    assert short.stats["rows_dropped"] == {"chat prompt longer than max_window_size": 1}


@pytest.mark.parametrize("kw,message", [
    ({"chat_template": True}, "the tokenizer has no chat template; give a Jinja template file"),
    ({"chat_template": "/no/such.jinja"}, "data.chat_template='/no/such.jinja' is not a readable template file"),
    ({"system_prompt": "be brief"}, "data.system_prompt goes into the chat template"),
    ({"chat_template": True, "mode": "strided"}, "data.chat_template wraps whole prompts (complete mode)"),
])
def test_chat_settings_are_checked(tok, kw, message):
    dm = GenerationDataModule(data_files="never-read.jsonl", block_size=40, max_new_tokens=4,
                              **({"mode": "complete"} | kw))
    with pytest.raises(ConfigError, match=re.escape(message)):
        dm.connect(tok)


def test_null_and_missing_prompts_are_dropped_and_named(tok, tmp_path, caplog):
    """JSON null, a key missing from a line and an empty CSV field are no prompt: dropped, with the
    rows named, never generated from as the text "None"."""
    rows = [{"text": words(0, 2)}, {"text": None}, {"other": 1}, {"text": ""}] + [{"text": None}] * 5
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING", logger="lgen.data"):
        dm = module(tok, path, mode="complete", block_size=10, max_new_tokens=2)
    assert view(dm) == [(0, [1, 1], "w0 w1", "")]
    assert dm.stats["rows_dropped"] == {"null or missing prompt": 7, "empty prompt": 1}
    assert "dropped 7 of 9 rows: null or missing prompt (rows 1, 2, 4, 5, 6, ...)" in caplog.messages
    assert "dropped 1 of 9 rows: empty prompt (row 3)" in caplog.messages
    (tmp_path / "d.csv").write_text(f"text,k\n{words(0, 2)},1\n,2\n")
    dm = module(tok, str(tmp_path / "d.csv"), mode="complete", block_size=10, max_new_tokens=2)
    assert view(dm) == [(0, [1, 1], "w0 w1", "")]
    assert dm.stats["rows_dropped"] == {"null or missing prompt": 1}
    strided = module(tok, path, block_size=6, max_window_size=1, max_new_tokens=1)
    assert [tok_text(strided, ex["input_ids"]) for ex in strided.examples] == ["w0"]
    assert strided.stats["rows_dropped"] == {"null or missing prompt": 7,
                                             "shorter than max_window_size + max_new_tokens": 1}


def test_null_references_are_dropped(tok, tmp_path):
    rows = [{"text": words(0, 2), "ref": words(2, 3)}, {"text": words(0, 2), "ref": None}, {"text": words(0, 2)}]
    dm = module(tok, write_jsonl(tmp_path / "d.jsonl", rows), block_size=10, max_new_tokens="auto",
                reference_column_name="ref")
    assert view(dm) == [(0, [1, 1], "w0 w1", "w2")]
    assert dm.stats["rows_dropped"] == {"null or missing reference": 2}


def test_null_prompts_with_a_chat_template_are_dropped(tok, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 2)}, {"text": None}])
    dm = module(tok, path, mode="complete", block_size=40, max_new_tokens=4, chat_template=str(template))
    assert [ex["meta"]["prompt_text"] for ex in dm.examples] == [words(0, 2)]
    assert dm.stats["rows_dropped"] == {"null or missing prompt": 1}


@pytest.mark.parametrize("rows,message", [
    ([{"text": None}, {"text": None}], "every row was dropped ({'null or missing prompt': 2}); every prompt is "
                                       "empty or null: check data.text_column_name='text'"),
    ([{"text": ""}, {"text": None}], "every row was dropped ({'empty prompt': 1, 'null or missing prompt': 1}); "
                                     "every prompt is empty or null: check data.text_column_name='text'"),
])
def test_every_prompt_empty_or_null_names_the_column(tok, tmp_path, rows, message):
    with pytest.raises(DataError) as err:
        module(tok, write_jsonl(tmp_path / "d.jsonl", rows), mode="complete", block_size=10, max_new_tokens=2)
    assert str(err.value) == message


def test_an_empty_csv_column_is_null_not_numbers(tok, tmp_path):
    (tmp_path / "d.csv").write_text("text,k\n,1\n,2\n")  # pandas reads the empty column as float64 NaN
    with pytest.raises(DataError, match=re.escape("every prompt is empty or null: check data.text_column_name")):
        module(tok, str(tmp_path / "d.csv"), mode="complete", block_size=10, max_new_tokens=2)


@pytest.mark.parametrize("value,kind", [
    (["w0", "w1"], "lists (List(Value('string')))"),
    ({"a": "w0"}, "dicts"),
    (3, "int64 values"),
    (1.5, "float64 values"),
])
def test_a_prompt_column_that_is_not_text_is_refused(tok, tmp_path, value, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": value, "other": "w0"}])
    with pytest.raises(DataError) as err:
        module(tok, path, mode="complete", block_size=10, max_new_tokens=2)
    assert str(err.value) == (f"data.text_column_name='text' holds {kind}, not text; choose a text column "
                              "(columns: ['text', 'other']) or convert this one to strings")


def test_a_reference_column_that_is_not_text_is_refused(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "w0", "ref": ["w1"]}])
    with pytest.raises(DataError, match=re.escape("data.reference_column_name='ref' holds lists")):
        module(tok, path, block_size=10, max_new_tokens="auto", reference_column_name="ref")


def binary_and_time_parquet(path) -> str:
    """A parquet file whose columns JSON cannot hold: binary, timestamp, date, decimal."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "text": ["w0 w1", "w2"],
        "blob": pa.array([b"\x00\x01", b"x"], pa.binary()),
        "when": pa.array([datetime.datetime(2024, 1, 2, 3, 4)] * 2, pa.timestamp("ms")),
        "day": pa.array([datetime.date(2024, 1, 2)] * 2, pa.date32()),
        "price": pa.array([decimal.Decimal("1.50")] * 2, pa.decimal128(5, 2)),
        "nested": pa.array([[b"x"], []], pa.list_(pa.binary())),
        "fine": [1, 2],
    })
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("column,kind,feature", [
    ("blob", "bytes", "Value('binary')"),
    ("when", "datetime.datetime", "Value('timestamp[ms]')"),
    ("day", "datetime.date", "Value('date32')"),
    ("price", "decimal.Decimal", "Value('decimal128(5, 2)')"),
    ("nested", "bytes", "List(Value('binary'))"),
])
def test_keep_columns_json_cannot_hold_are_refused_in_setup(tok, tmp_path, column, kind, feature):
    path = binary_and_time_parquet(tmp_path / "d.parquet")
    with pytest.raises(ConfigError) as err:
        module(tok, path, mode="complete", block_size=10, max_new_tokens=2, keep_columns=["fine", column])
    assert str(err.value) == (f"data.keep_columns: column {column!r} holds {kind} values ({feature}; row 0), which a "
                              "JSON record cannot hold; leave it out of data.keep_columns, or convert the column to "
                              "text first")


def test_an_id_column_json_cannot_hold_is_refused(tok, tmp_path):
    path = binary_and_time_parquet(tmp_path / "d.parquet")
    with pytest.raises(ConfigError) as err:
        module(tok, path, mode="complete", block_size=10, max_new_tokens=2, id_column_name="when")
    assert str(err.value) == ("data.id_column_name='when' holds datetime.datetime values (Value('timestamp[ms]'); "
                              "row 0), which a JSON record cannot hold; choose another id column, or leave "
                              "data.id_column_name unset to use the row index")
    dm = module(tok, path, mode="complete", block_size=10, max_new_tokens=2, id_column_name="fine",
                keep_columns=["fine"])
    assert [(ex["id"], ex["keep"]) for ex in dm.examples] == [(1, {"fine": 1}), (2, {"fine": 2})]


GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              + TEMPLATE)


@pytest.mark.parametrize("text,system,message", [
    ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", None,
     ", line 2: the template does not parse (unexpected '}'); fix the template"),
    (GEMMA_LIKE, "be brief", " fails on a sample conversation (TemplateError: System role not supported); the "
                             "template takes no system message: unset data.system_prompt, or give another template"),
    ("{{ messages[0]['content'].nope.x }}", None, " fails on a sample conversation (UndefinedError: 'str object' "
                                                  "has no attribute 'nope'); fix the template, or give another one"),
])
def test_a_chat_template_that_cannot_work_is_refused_in_connect(tok, tmp_path, text, system, message):
    template = tmp_path / "chat.jinja"
    template.write_text(text)
    dm = GenerationDataModule(data_files="never-read.jsonl", mode="complete", block_size=40, max_new_tokens=4,
                              chat_template=str(template), system_prompt=system)
    with pytest.raises(ConfigError) as err:
        dm.connect(tok)
    assert str(err.value) == f"data.chat_template={str(template)!r}{message}"


def test_the_tokenizers_own_chat_template_is_checked_too(tmp_path):
    own = make_word_tokenizer(tmp_path)
    own.chat_template = GEMMA_LIKE
    dm = GenerationDataModule(data_files="never-read.jsonl", mode="complete", block_size=40, max_new_tokens=4,
                              chat_template=True, system_prompt="be brief")
    with pytest.raises(ConfigError, match=re.escape("data.chat_template: true (the tokenizer's template) fails on a "
                                                    "sample conversation (TemplateError: System role not supported)")):
        dm.connect(own)
    dm.system_prompt = None
    dm.connect(own)  # without a system message it works


def test_a_chat_template_that_fails_on_one_row_names_it(tok, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{% if 'w3' in m['content'] %}{{ raise_exception('no w3 here') }}"
                        "{% endif %}{% endfor %}" + TEMPLATE)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words(0, 2)}, {"text": words(2, 4)}])
    with pytest.raises(DataError) as err:
        module(tok, path, mode="complete", block_size=40, max_new_tokens=4, chat_template=str(template))
    assert str(err.value) == ("data.chat_template fails on row 1 (TemplateError: no w3 here); fix the template or "
                              "that row")


@pytest.mark.parametrize("suffix,opener", [(".gz", "gzip"), (".bz2", "bz2"), (".xz", "lzma")])
@pytest.mark.parametrize("dataset_name", [None, "json"])
def test_compressed_json_lines_load(tok, tmp_path, suffix, opener, dataset_name):
    """datasets decompresses; the format comes from the suffix under the compression's."""
    import importlib

    path = tmp_path / f"d.jsonl{suffix}"
    with importlib.import_module(opener).open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": words(0, 3)}) + "\n" + json.dumps({"text": "w9 w10"}) + "\n")
    dm = module(tok, str(path), dataset_name=dataset_name, mode="complete", block_size=10, max_new_tokens=2)
    assert view(dm) == [(0, [1, 1], "w0 w1 w2", ""), (1, [1, 1], "w9 w10", "")]


@pytest.mark.parametrize("split", ["val-2", "test[:5]", "a b", ""])
def test_a_bad_split_name_for_local_files_is_refused(split):
    with pytest.raises(ConfigError) as err:
        GenerationDataModule(data_files="never-read.jsonl", dataset_split=split)
    assert str(err.value) == (f"data.dataset_split={split!r} is not a split name: with data.data_files it may hold "
                              "only letters, digits and underscores, in parts joined by dots (e.g. val_2)")
    GenerationDataModule(data_files="never-read.jsonl", dataset_split="val_2.part1")


@pytest.mark.parametrize("rows,kw,hint", [
    ([{"text": words(0, 3), "ref": words(3, 10)}], {"reference_column_name": "ref", "max_new_tokens": "auto"},
     "prompt + reference must fit in block_size - 1: raise data.block_size or lower data.max_window_size"),
    ([{"text": words(0, 3), "ref": None}], {"reference_column_name": "ref", "max_new_tokens": "auto"},
     "check data.reference_column_name='ref'"),
    ([{"text": words(0, 3), "ref": words(3, 10)}, {"text": None, "ref": "w0"}],
     {"reference_column_name": "ref", "max_new_tokens": "auto"},
     "check data.text_column_name='text'; prompt + reference must fit in block_size - 1"),
])
def test_every_row_dropped_hints_by_reason(tok, tmp_path, rows, kw, hint):
    with pytest.raises(DataError) as err:
        module(tok, write_jsonl(tmp_path / "d.jsonl", rows), block_size=8, **kw)
    assert str(err.value).split("); ", 1)[1].startswith(hint)
    assert "every prompt is empty or null" not in str(err.value)


def test_a_capped_model_max_length_is_said_once(caplog):
    """A tokenizer that says 10^30 positions (many do) gets block_size from the model, and a Python
    caller running job after job hears it once, not at every job."""
    from lgen.data import lengths

    lengths._capped.cache_clear()
    with caplog.at_level("WARNING", logger="lgen.data.lengths"):
        for _ in range(3):
            got = lengths.resolve(block_size=None, max_window_size=None, max_new_tokens=8,
                                  model_max_length=int(1e30), max_position_embeddings=2048)
    assert got.block == 1024
    said = [r.getMessage() for r in caplog.records if "model_max_length" in r.getMessage()]
    assert said == [f"tokenizer.model_max_length={int(1e30)} exceeds the model's max_position_embeddings=2048; "
                    "using block_size=1024 (set data.block_size to choose)"]

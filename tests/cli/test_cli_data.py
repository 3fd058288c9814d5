"""The embedded default dataset and tokenizer; user datasets and their fields."""
from __future__ import annotations

import pytest

from chronicals_compile.cli import data
from chronicals_compile.testing.cli_runner import write_jsonl


@pytest.fixture(scope="module")
def default():
    ds = data.default_dataset()
    fields = data.resolve_fields(ds.column_names)
    tok = data.train_tokenizer(data.corpus_texts(ds, fields), vocab_size=1024)
    return ds, fields, tok


def test_default_dataset_is_stdlib_docstrings(default):
    ds, fields, _ = default
    assert fields == data.Fields(prompt="prompt", response="response")
    assert len(ds) > 500  # ~1200 on CPython 3.11
    row = next(r for r in ds if r["prompt"] == "Explain json.dumps.\n")
    assert "JSON" in row["response"]
    assert all(r["prompt"].startswith("Explain ") for r in ds.select(range(50)))
    assert len(set(ds["response"])) == len(ds)  # each docstring once


def test_tokenizer_round_trips_and_has_specials(default):
    *_, tok = default
    assert len(tok) == 1024
    assert tok.eos_token == data.EOS_TOKEN and tok.pad_token == data.PAD_TOKEN
    text = "Return a copy of the string with leading whitespace removed."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenize_masks_prompt_and_ends_with_eos(default):
    ds, fields, tok = default
    out = data.tokenize(ds.select(range(40)), tok, fields, max_len=512)
    assert out.dataset.column_names == ["input_ids", "labels"]
    for raw, row in zip(ds.select(range(40)), out.dataset):
        n_prompt = len(tok(raw["prompt"])["input_ids"])
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        assert labels[:n_prompt] == [data.IGNORE_INDEX] * n_prompt
        if len(ids) < 512:
            assert labels[n_prompt:] == ids[n_prompt:]
            assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[n_prompt:]).startswith(raw["response"][:20])


def test_tokenize_truncates_long_responses(default):
    ds, fields, tok = default
    out = data.tokenize(ds, tok, fields, max_len=48)
    assert out.truncated > 0
    assert max(len(x) for x in out.dataset["input_ids"]) == 48


def test_text_field_scores_every_token(tmp_path, default):
    *_, tok = default
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "some text here"}, {"body": "more text"}])
    ds = data.load_dataset_path(path)
    fields = data.resolve_fields(ds.column_names, text="body")
    out = data.tokenize(ds, tok, fields, max_len=64)
    for row in out.dataset:
        assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


def test_datasets_folder_and_parquet(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "p", "response": "r"}])
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for path in ("folder", "dict", "d.parquet"):
        loaded = data.load_dataset_path(str(tmp_path / path))
        assert loaded.column_names == ["prompt", "response"] and len(loaded) == 1

"""The bad-input corpus (tests/data/bad/, one file per defect): each stops with a message naming
the file, the row and the field; with dataset.on_bad_row=skip, bad rows are dropped and counted."""

import os

import pytest
from omegaconf import OmegaConf

from dpo_sweep.config import DatasetConfig
from dpo_sweep.data import DataError, load_preference_data

BAD = os.path.join(os.path.dirname(__file__), "data", "bad")

# file -> what the message must say (the bad row of the .jsonl files is row 4)
EXPECTED = {
    "missing_chosen.jsonl": "row 4: missing field 'chosen'",
    "missing_rejected.jsonl": "row 4: missing field 'rejected'",
    "null_chosen.jsonl": "row 4: missing field 'chosen'",
    "chosen_not_string.jsonl": "row 4: field 'chosen': expected a string or a list of messages, got int",
    "prompt_not_string.jsonl": "row 4: field 'prompt': expected a string or a list of messages, got dict",
    "system_not_string.jsonl": "row 4: field 'system': expected a string, got list",
    "empty_chosen.jsonl": "row 4: field 'chosen': the response is empty",
    "whitespace_rejected.jsonl": "row 4: field 'rejected': the response is empty",
    "chosen_equals_rejected.jsonl": "row 4: fields 'chosen' and 'rejected' are identical",
    "implicit_prompt_no_difference.jsonl": "row 4: field 'chosen': the response is empty",
    "row_not_object.jsonl": "row 4: expected an object with fields prompt, chosen, rejected",
    "invalid_json.jsonl": "line 4: invalid JSON",
    "message_without_content.jsonl": "row 4: field 'chosen': message 0: expected {'role': str, 'content': str}",
    "message_not_object.jsonl": "row 4: field 'chosen': message 0: expected {'role': str, 'content': str}",
    "mixed_formats.jsonl": "row 4: fields 'chosen' and 'rejected' must both be strings or both message lists",
    "empty_message_response.jsonl": "row 4: field 'chosen': the response is empty",
    "missing_rejected_in_list.json": "row 2: missing field 'rejected'",
    "json_not_a_list.json": "expected a JSON list of rows, got dict",
    "csv_missing_column.csv": "row 1: missing field 'rejected'",
    "empty_file.jsonl": "the data set has no rows",
    "wrong_extension.tsv": "unsupported file type '.tsv'",
}


def load(tokenizer, name, **kw):
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), dict(path=os.path.join(BAD, name), eval_size=1, **kw))
    return load_preference_data(cfg, tokenizer, max_length=64, max_prompt_length=32)


def test_every_corpus_file_is_covered():
    assert sorted(os.listdir(BAD)) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_error_names_file_row_and_field(tokenizer, name):
    with pytest.raises(DataError) as e:
        load(tokenizer, name)
    message = str(e.value)
    assert os.path.join(BAD, name) in message, message
    assert EXPECTED[name] in message, message


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if n.endswith(".jsonl") and "row 4" in EXPECTED[n]])
def test_skip_drops_and_counts_the_bad_row(tokenizer, name):
    data = load(tokenizer, name, on_bad_row="skip")
    assert data.skipped == 1
    assert len(data.train) + len(data.eval) == 5

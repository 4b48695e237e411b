"""Data rows that go wrong in real files: pairs that truncation makes identical, responses that
lose their EOS, text that is not UTF-8, empty conversations, numeric CSV cells, files edited
between two loads."""

import json
import logging
import os

import pytest
from omegaconf import OmegaConf

from conftest import compose, write_jsonl
from dpo_sweep.config import DatasetConfig
from dpo_sweep.data import DataError, load_preference_data

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def dataset_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def load(path, tokenizer, max_length=64, max_prompt_length=32, **kw):
    return load_preference_data(dataset_cfg(path=str(path), **kw), tokenizer, max_length, max_prompt_length)


def decoded(tokenizer, ids):
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------- truncation


def rows_sharing_a_start(n_same, n_differ):
    """n_same pairs whose answers differ only after 10 shared characters, n_differ that differ at once."""
    same = [{"prompt": "p", "chosen": f"the answer{k} is yes", "rejected": f"the answer{k} is no"}
            for k in range(n_same)]
    differ = [{"prompt": "p", "chosen": f"yes {k}", "rejected": f"no {k}"} for k in range(n_differ)]
    return same + differ


def test_pairs_identical_after_truncation_are_dropped_counted_and_warned(tokenizer, tmp_path, caplog):
    # Prompt "p" is 2 tokens (BOS, p); max_length 8 leaves 6 for each answer: "the an" twice.
    path = write_jsonl(tmp_path / "d.jsonl", rows_sharing_a_start(3, 7))
    with caplog.at_level(logging.WARNING, logger="dpo_sweep.data"):
        data = load(path, tokenizer, max_length=8, max_prompt_length=4, eval_size=2)
    assert data.dropped_identical == 3 and data.skipped == 0
    assert len(data.train) + len(data.eval) == 7
    assert all(p.chosen_ids != p.rejected_ids for p in data.train + data.eval)
    warnings = [r.getMessage() for r in caplog.records if "identical after truncation" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "dropped 3 of 10 pairs (30%)" in warnings[0] and "train.max_length = 8" in warnings[0]
    assert "train.max_prompt_length = 4" in warnings[0]


def test_few_identical_pairs_are_dropped_without_a_warning(tokenizer, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", rows_sharing_a_start(1, 19))
    with caplog.at_level(logging.WARNING, logger="dpo_sweep.data"):
        data = load(path, tokenizer, max_length=8, max_prompt_length=4, eval_size=2)
    assert data.dropped_identical == 1 and len(data.train) + len(data.eval) == 19
    assert not [r for r in caplog.records if "identical after truncation" in r.getMessage()]


def test_answers_the_tokenizer_cannot_tell_apart_name_the_row(tokenizer, tmp_path):
    # The character tokenizer reads both accented letters as <unk>: the same tokens, nothing cut.
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "p", "chosen": "caf\u00e9", "rejected": "caf\u00fc"},
                                              GOOD, GOOD])
    with pytest.raises(DataError, match=r"d.jsonl: row 2: fields 'chosen' and 'rejected' are the same tokens"):
        load(path, tokenizer, eval_size=1)
    assert load(path, tokenizer, eval_size=1, on_bad_row="skip").skipped == 1


def test_lost_eos_counted_and_summary_reaches_log_and_tracker(tokenizer, tmp_path, caplog):
    from dpo_sweep.setup import prepare_run
    from dpo_sweep.tracking import Tracker, get_run

    rows = rows_sharing_a_start(2, 6) + [{"prompt": "p", "chosen": "a long answer", "rejected": "no"}] * 2
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = compose([f"dataset.path={path}", "dataset.eval_size=2", "train.max_length=8",
                   "train.max_prompt_length=4", "train.device=cpu"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "faults")
    with caplog.at_level(logging.INFO, logger="dpo_sweep.setup"):
        run = prepare_run(cfg, tracker)
    tracker.flush()
    # Kept: 6 short pairs (nothing cut) and 2 with "a long answer" cut to "a long": 2 EOS lost.
    assert run.data.dropped_identical == 2 and run.data.lost_eos == 2
    assert sum(p.chosen_ids[-1] != tokenizer.eos_token_id for p in run.data.train + run.data.eval) == 2
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert len(summary) == 1
    assert "2 pairs dropped" in summary[0] and "2 responses lost their EOS" in summary[0]
    tracker.end()
    logged = get_run(uri, tracker.run_id)
    assert not any(k.startswith("data/") for k in logged.metrics)  # counts are params, not curves
    assert {k: logged.params[k] for k in ("data/dropped_identical", "data/lost_eos", "data/skipped_rows")} == {
        "data/dropped_identical": "2", "data/lost_eos": "2", "data/skipped_rows": "0"}
    from mlflow.tracking import MlflowClient
    inputs = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert sorted(contexts) == ["eval", "train"] and contexts["train"].name == "d.jsonl (train)"
    assert contexts["train"].source_type == "local" and len(contexts["train"].digest) == 8


# ---------------------------------------------------------------------------- encodings


def write_latin1(path, ext):
    """Three rows; the second's chosen answer holds an e-acute, written as latin-1 (byte 0xe9)."""
    rows = [GOOD, {"prompt": "p", "chosen": "caf\u00e9", "rejected": "b"}, {"prompt": "q", "chosen": "a",
                                                                          "rejected": "c"}]
    if ext == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif ext == "json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
    path.write_bytes(text.encode("latin-1"))
    return path


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_latin1_row_names_file_row_and_field_and_can_be_skipped(tokenizer, tmp_path, ext):
    path = write_latin1(tmp_path / f"d.{ext}", ext)
    with pytest.raises(DataError) as e:
        load(path, tokenizer, eval_size=1)
    message = str(e.value)
    assert "\n" not in message
    assert f"{path}: row 2: field 'chosen': byte 0xe9 is not UTF-8" in message and "expected UTF-8" in message
    data = load(path, tokenizer, eval_size=1, on_bad_row="skip")
    assert data.skipped == 1 and len(data.train) == 1 and len(data.eval) == 1
    assert [p.row for p in data.train + data.eval] == [0, 2]


def test_file_that_is_not_utf8_at_all_is_one_error(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes("".join(json.dumps(GOOD) + "\n" for _ in range(4)).encode("utf-16"))
    for policy in ("error", "skip"):  # skipping rows cannot help: no row of it is UTF-8
        with pytest.raises(DataError) as e:
            load(path, tokenizer, eval_size=1, on_bad_row=policy)
        message = str(e.value)
        assert message.startswith(f"{path}: byte 0xff at offset 0 (line 1)") and "expected a UTF-8 file" in message


def test_lone_surrogate_in_json_names_file_row_and_field(tokenizer, tmp_path):
    path = tmp_path / "d.json"
    # The escape \ud800 as JSON spells it: half of a surrogate pair, valid JSON but no character.
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"},\n'
                    ' {"prompt": "p", "chosen": "x\\ud800y", "rejected": "b"},\n'
                    ' {"prompt": "q", "chosen": "a", "rejected": "c"}]', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load(path, tokenizer, eval_size=1)
    message = str(e.value)
    assert "\n" not in message
    assert f"{path}: row 2: field 'chosen': a lone surrogate '\\ud800' at character 1" in message
    assert "expected valid Unicode text" in message
    data = load(path, tokenizer, eval_size=1, on_bad_row="skip")
    assert data.skipped == 1 and [p.row for p in data.train + data.eval] == [0, 2]


def test_lone_surrogate_in_message_content_names_the_message(tokenizer, tmp_path):
    msg = [{"role": "assistant", "content": "ok"}]
    path = tmp_path / "d.jsonl"
    bad = json.dumps({"prompt": "p", "chosen": msg, "rejected": [{"role": "assistant", "content": "no\ud800"}]})
    path.write_text("\n".join([json.dumps(GOOD), bad, json.dumps(GOOD), json.dumps(GOOD)]) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl: row 2: field 'rejected': message 0: content: a lone surrogate"):
        load(path, tokenizer, eval_size=1)


# ---------------------------------------------------------------------------- conversations


ANSWER = [{"role": "assistant", "content": "4"}]
OTHER = [{"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "2+2?", "chosen": [], "rejected": OTHER}, "field 'chosen': an empty message list; expected at least one"),
    ({"prompt": [], "chosen": ANSWER, "rejected": OTHER}, "field 'prompt': an empty message list; expected at least one"),
    ({"chosen": ANSWER, "rejected": OTHER}, "field 'prompt': missing, and 'chosen' and 'rejected' share no leading message"),
])
def test_empty_conversation_names_row_and_field_and_can_be_skipped(tokenizer, tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row, GOOD, GOOD])
    with pytest.raises(DataError) as e:
        load(path, tokenizer, eval_size=1)
    assert str(e.value).startswith(f"{path}: row 2: ") and message in str(e.value) and "\n" not in str(e.value)
    data = load(path, tokenizer, eval_size=1, on_bad_row="skip")
    assert data.skipped == 1 and len(data.train) + len(data.eval) == 3


# ---------------------------------------------------------------------------- CSV and files on disk


def test_csv_cells_are_read_as_text(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    # Every answer looks like a number; Excel's "CSV UTF-8" starts the file with a BOM.
    path.write_text("prompt,chosen,rejected\nSix times seven?,42,41\nJames Bond?,007,7\nNothing?,NA,0.50\n",
                    encoding="utf-8-sig")
    data = load(path, tokenizer, eval_size=1)
    eos = tokenizer.eos_token
    texts = [(decoded(tokenizer, p.prompt_ids), decoded(tokenizer, p.chosen_ids), decoded(tokenizer, p.rejected_ids))
             for p in data.train + data.eval]
    assert texts == [("<s>Six times seven?", "42" + eos, "41" + eos), ("<s>James Bond?", "007" + eos, "7" + eos),
                     ("<s>Nothing?", "NA" + eos, "0.50" + eos)]


def test_csv_row_with_a_missing_cell_names_the_row(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a,b,extra\np,a,c\nq,a,b\n")
    with pytest.raises(DataError, match=r"d.csv: row 2: 4 cells; expected 3"):
        load(path, tokenizer, eval_size=1)


def write_rows(path, ext, chosen):
    import pandas as pd

    frame = pd.DataFrame([{"prompt": f"p{k}", "chosen": c, "rejected": "zz"} for k, c in enumerate(chosen)])
    if ext == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_local_file_changed_on_disk_is_read_afresh(tokenizer, tmp_path, ext):
    path = tmp_path / f"d.{ext}"
    write_rows(path, ext, ["aa", "bb", "cc"])
    before = os.stat(path)
    first = load(path, tokenizer, eval_size=1)
    # New answers of the same length; the modification time set back, as `cp -p` or an unpacked
    # archive leaves it: only the content tells the two files apart.
    write_rows(path, ext, ["xx", "yy", "ww"])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = load(path, tokenizer, eval_size=1)
    assert [decoded(tokenizer, p.chosen_ids[:-1]) for p in first.train] == ["aa", "bb"]
    assert [decoded(tokenizer, p.chosen_ids[:-1]) for p in second.train] == ["xx", "yy"]
    assert decoded(tokenizer, second.eval[0].chosen_ids[:-1]) == "ww"

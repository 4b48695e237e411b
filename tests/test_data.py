"""Loading, normalising, tokenising and batching preference rows."""

import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import write_jsonl
from dpo_sweep.config import DatasetConfig
from dpo_sweep.data import (DataError, Pair, batch_indices, builtin_rows, collate, load_preference_data,
                            normalise, tokenise)
from dpo_sweep.tasks import solve


def ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def dataset_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), kw)


def test_standard_row_tokenised_with_bos_and_eos(tokenizer):
    texts = normalise({"prompt": "Q: hi\n", "chosen": "yes", "rejected": "no"}, tokenizer, "row 0")
    pair = tokenise(*texts, tokenizer, max_length=64, max_prompt_length=32, where="row 0", row=0)
    assert list(pair.prompt_ids) == [tokenizer.bos_token_id] + ids(tokenizer, "Q: hi\n")
    assert list(pair.chosen_ids) == ids(tokenizer, "yes") + [tokenizer.eos_token_id]
    assert list(pair.rejected_ids) == ids(tokenizer, "no") + [tokenizer.eos_token_id]


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    texts = normalise({"prompt": "abcdefghij", "chosen": "0123456789", "rejected": "xy"}, tokenizer, "r")
    pair = tokenise(*texts, tokenizer, max_length=10, max_prompt_length=4, where="r", row=0)
    assert tokenizer.decode(pair.prompt_ids) == "ghij"
    assert tokenizer.decode(pair.chosen_ids) == "012345"  # 4 + 6 = max_length; EOS cut off
    assert list(pair.rejected_ids) == ids(tokenizer, "xy") + [tokenizer.eos_token_id]


def test_system_prepended_without_chat_template(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                              pad_token="<pad>")
    tok.chat_template = None
    prompt, _, _, templated = normalise({"system": "Be brief.", "prompt": "Hi", "chosen": "a", "rejected": "b"},
                                        tok, "r")
    assert prompt == "Be brief.\n\nHi" and not templated


def test_conversational_row_uses_chat_template(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    prompt, chosen, rejected, templated = normalise(row, tokenizer, "r")
    assert templated
    assert prompt == "<|user|>\n2+2?</s>\n<|assistant|>\n"
    assert chosen == "4</s>\n" and rejected == "5</s>\n"


def test_implicit_prompt_from_shared_messages(tokenizer):
    user = {"role": "user", "content": "Name a color"}
    row = {"chosen": [user, {"role": "assistant", "content": "blue"}],
           "rejected": [user, {"role": "assistant", "content": "seven"}]}
    prompt, chosen, rejected, _ = normalise(row, tokenizer, "r")
    assert prompt.endswith("<|assistant|>\n") and "Name a color" in prompt
    assert chosen.startswith("blue") and rejected.startswith("seven")


def test_implicit_prompt_from_shared_text(tokenizer):
    prompt, chosen, rejected, _ = normalise({"chosen": "The sky is blue", "rejected": "The sky is green"},
                                            tokenizer, "r")
    assert (prompt, chosen, rejected) == ("The sky is", " blue", " green")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "rejected": "b"}, "row 4: missing field 'chosen'"),
    ({"prompt": "p", "chosen": "a"}, "row 4: missing field 'rejected'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "row 4: field 'chosen': the response is empty"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "row 4: field 'chosen': expected a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "row 4: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]},
     "row 4: field 'chosen': message 0"),
    ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "x"}]},
     "both be strings or both message lists"),
])
def test_bad_rows_name_the_row_and_field(tokenizer, tmp_path, row, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, good, row, good])
    with pytest.raises(DataError) as e:
        load_preference_data(dataset_cfg(path=path, eval_size=1), tokenizer, 64, 32)
    assert path in str(e.value) and message in str(e.value)


def test_skip_policy_counts_bad_rows(tokenizer, tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [good, {"prompt": "p"}, good, good, {"chosen": "x", "rejected": "x"}, good]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_preference_data(dataset_cfg(path=path, eval_size=2, on_bad_row="skip"), tokenizer, 64, 32)
    assert data.skipped == 2 and len(data.train) == 3 and len(data.eval) == 1
    assert data.eval[0].row == 5  # rows keep their index in the file


def test_invalid_json_line_and_missing_file(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: invalid JSON"):
        load_preference_data(dataset_cfg(path=str(path)), tokenizer, 64, 32)
    with pytest.raises(DataError, match=r"nope.jsonl' does not exist"):
        load_preference_data(dataset_cfg(path=str(tmp_path / "nope.jsonl")), tokenizer, 64, 32)


@pytest.mark.parametrize("ext", ["json", "parquet", "csv"])
def test_local_formats(tokenizer, tmp_path, ext):
    import pandas as pd

    rows = builtin_rows(20)
    path = tmp_path / f"d.{ext}"
    if ext == "json":
        path.write_text(json.dumps(rows))
    elif ext == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    data = load_preference_data(dataset_cfg(path=str(path), eval_size=5), tokenizer, 128, 64)
    assert len(data.train) == 15 and len(data.eval) == 5
    assert tokenizer.decode(data.eval[0].chosen_ids[:-1]) == rows[15]["chosen"]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_builtin_set_is_fixed_and_correct(version):
    rows = builtin_rows(200, version=version)
    assert rows == builtin_rows(200, version=version)
    assert {r["prompt"].split(":")[0] for r in rows} == {"Uppercase", "Sort", "Add", "Reverse"}
    for r in rows:
        assert r["chosen"] == solve(r["prompt"]) != r["rejected"], r
        if r["prompt"].startswith("Add: "):
            a, b = r["prompt"][len("Add: "):].split("\n")[0].split("+")
            assert int(r["chosen"]) == int(a) + int(b)
        if r["prompt"].startswith("Sort: "):
            assert r["chosen"] == " ".join(sorted(r["chosen"].split()))
    if version == 3:  # one non-answer for every row
        assert {r["rejected"] for r in rows} == {"not sure"}
    if version == 2:  # a systematic mistake per task: the input copied, for uppercase and reverse
        for r in rows:
            if r["prompt"].startswith(("Uppercase", "Reverse")):
                assert r["rejected"] == r["prompt"].split(": ", 1)[1].split("\n")[0]


@pytest.mark.parametrize("version, digest", [(1, "6391d1dd7b495424"), (2, "2498ff8a99522133"),
                                             (3, "ff32636b94333895")])
def test_builtin_versions_stay_as_they_were(version, digest):
    """A run saved with a version reproduces only if that version's rows never change."""
    rows = json.dumps(builtin_rows(100, version=version)).encode()
    assert hashlib.sha256(rows).hexdigest()[:16] == digest


def test_collate_masks_only_responses(tokenizer):
    pairs = [Pair((1, 10, 11), (20, 2), (30, 31, 2), 0), Pair((1, 12), (21, 22, 23, 2), (32, 2), 1)]
    b = collate(pairs, pad_id=0)
    assert b["input_ids"].shape == (4, 6)
    assert b["input_ids"][0].tolist() == [1, 10, 11, 20, 2, 0]  # chosen rows first
    assert b["input_ids"][2].tolist() == [1, 10, 11, 30, 31, 2]  # then rejected rows
    assert b["loss_mask"][0].tolist() == [False, False, False, True, True, False]
    assert b["loss_mask"][3].tolist() == [False, False, True, True, False, False]
    left = collate(pairs, pad_id=0, padding_side="left")
    assert left["input_ids"][0].tolist() == [0, 1, 10, 11, 20, 2]
    assert left["loss_mask"][0].tolist() == [False, False, False, False, True, True]


def test_length_grouping_reduces_padding(tokenizer):
    pairs = [Pair((1,) * n, (2,) * (n % 7 + 1), (2,), i) for i, n in enumerate(torch.randint(1, 60, (256,)).tolist())]

    def padding(batches):
        return sum(len(b) * max(pairs[i].length for i in b) - sum(pairs[i].length for i in b) for b in batches)

    g = torch.Generator().manual_seed(0)
    grouped = batch_indices(pairs, 8, shuffle=True, group_by_length=True, generator=g)
    plain = batch_indices(pairs, 8, shuffle=True, group_by_length=False, generator=g)
    assert sorted(i for b in grouped for i in b) == list(range(256))
    assert padding(grouped) < padding(plain) / 4


def test_length_grouping_follows_the_layout():
    """One row a pair pads to prompt + chosen + rejected; two rows a pair to prompt + the longer
    response. Each grouping keeps its own layout's padding lowest."""
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 40, (256, 3), generator=g).tolist()
    pairs = [Pair((1,) * p, (2,) * c, (3,) * r, i) for i, (p, c, r) in enumerate(sizes)]

    def positions(batches, shared):
        rows, length = (1, lambda p: p.shared_length) if shared else (2, lambda p: p.length)
        return sum(rows * len(b) * max(length(pairs[i]) for i in b) for b in batches)

    for shared in (True, False):
        mine = batch_indices(pairs, 8, shuffle=False, group_by_length=True, shared_prompt=shared)
        other = batch_indices(pairs, 8, shuffle=False, group_by_length=True, shared_prompt=not shared)
        assert positions(mine, shared) < positions(other, shared)
    one_row = positions(batch_indices(pairs, 8, False, True, shared_prompt=True), True)
    assert one_row < 0.85 * positions(batch_indices(pairs, 8, False, True), False)  # the prompt once, less padding

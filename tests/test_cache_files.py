"""The cache files under outputs/cache/: reading one never runs code, and a truncated, altered or
unsigned one is never used: a warning names it and its contents are computed again."""

import logging
import os
import pickle

import pytest
import torch

from conftest import compose, make_tiny_llama
from dpo_sweep import cache_files
from dpo_sweep.data import load_preference_data
from dpo_sweep.gen_eval import GenEvaluator
from dpo_sweep.judges import build_judge
from dpo_sweep.reference import autocast_for, precomputed
from dpo_sweep.sft import apply_sft

CPU = torch.device("cpu")
FP32 = autocast_for(CPU, "fp32")


class RunsCode:
    """Unpickling this creates the file `target`: what a crafted cache file could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.fixture
def data(tokenizer):
    cfg = compose(["dataset.builtin_size=24", "dataset.eval_size=8", "sft.steps=4", "sft.batch_size=4"])
    train = load_preference_data(cfg.dataset, tokenizer, 128, 64)
    return cfg, {"train": train.train, "eval": train.eval}


def reference(model, splits, tokenizer, cache):
    return precomputed(model, splits, tokenizer.pad_token_id, 8, CPU, FP32, str(cache), "precision=fp32")


def only(folder, pattern):
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_a_crafted_reference_cache_runs_no_code_and_is_recomputed(tokenizer, tmp_path, data, caplog):
    _, splits = data
    model = make_tiny_llama(tokenizer)
    fresh, hit = reference(model, splits, tokenizer, tmp_path)
    assert hit is False
    path = only(tmp_path, "reflogps-*.safetensors")
    marker = tmp_path / "code-ran"
    for target in (path, tmp_path / (path.stem + ".pt")):  # the new name and the old pickle name
        with open(target, "wb") as f:
            pickle.dump(RunsCode(str(marker)), f)
    with caplog.at_level(logging.WARNING):
        again, hit = reference(model, splits, tokenizer, tmp_path)
    assert not marker.exists()  # nothing was unpickled
    assert hit is False and str(path) in caplog.text and "does not match its checksum" in caplog.text
    for split in splits:
        assert torch.equal(again.tables[split], fresh.tables[split])
    assert reference(model, splits, tokenizer, tmp_path)[1] is True  # rewritten: a hit again


@pytest.mark.parametrize("damage", ["truncate", "alter", "no_checksum"])
def test_a_damaged_reference_cache_is_recomputed_with_a_warning(tokenizer, tmp_path, data, caplog, damage):
    _, splits = data
    model = make_tiny_llama(tokenizer)
    fresh, _ = reference(model, splits, tokenizer, tmp_path)
    path = only(tmp_path, "reflogps-*.safetensors")
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "alter":  # a valid safetensors file with other values: what a silent edit gives
        from safetensors.torch import save_file
        save_file({k: v + 1.0 for k, v in fresh.tables.items()}, str(path))
    else:
        os.remove(str(path) + ".sha256")
    with caplog.at_level(logging.WARNING):
        again, hit = reference(model, splits, tokenizer, tmp_path)
    assert hit is False and str(path) in caplog.text
    for split in splits:
        assert torch.equal(again.tables[split], fresh.tables[split])


def test_an_altered_sft_cache_is_trained_again(tokenizer, tmp_path, data, caplog):
    cfg, splits = data
    args = (splits["train"], cfg.sft, tokenizer.pad_token_id, CPU, FP32, str(tmp_path))
    first = make_tiny_llama(tokenizer)
    assert apply_sft(first, *args) is False
    path = only(tmp_path, "sft-*.safetensors")
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-8:] = b"\x00" * 8  # flip the last weights' bytes: the header still parses
    path.write_bytes(bytes(data_bytes))
    second = make_tiny_llama(tokenizer)
    with caplog.at_level(logging.WARNING):
        assert apply_sft(second, *args) is False  # trained again, not loaded
    assert str(path) in caplog.text
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert apply_sft(make_tiny_llama(tokenizer), *args) is True  # and cached again


def test_altered_reference_samples_are_drawn_again(tokenizer, tmp_path, data, caplog):
    cfg, splits = data
    model = make_tiny_llama(tokenizer)
    judge = build_judge(compose(["judge=builtin"]).judge, CPU)

    def evaluator():
        return GenEvaluator(cfg.eval.gen, judge, tokenizer, splits["eval"], model, FP32, 8, str(tmp_path))

    first = evaluator().reference
    path = only(tmp_path, "refsamples-*.json")
    path.write_text(path.read_text().replace("[", "[99, ", 1))  # one token slipped into an answer
    with caplog.at_level(logging.WARNING):
        second = evaluator().reference
    assert str(path) in caplog.text
    assert second.answers == first.answers and second.ref_logps == first.ref_logps


def test_cache_file_round_trip_and_sidecar(tmp_path):
    path = str(tmp_path / "x.json")
    assert cache_files.load_json(path, "test") is None  # missing: no warning needed, just absent
    cache_files.save_json(path, {"a": [1, 2]})
    assert cache_files.load_json(path, "test") == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.json.sha256"]  # no temporary file left

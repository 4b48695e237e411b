"""The hub presets compose and reach the real Hugging Face loading code (offline here, so it must
fail there, naming what it tried to load, after the config checks passed)."""

import pytest

from conftest import compose, write_jsonl
from dpo_sweep.config import validate
from dpo_sweep.data import DataError, load_rows
from dpo_sweep.models import load_tokenizer


def test_phi2_preset_loads_through_transformers():
    # truthy has no judge, so the objective is one this run logs without one (as in phi2_truthy)
    cfg = compose(["model=phi2", "dataset=truthy", "objective.metric=eval/rewards/accuracies"])
    validate(cfg)
    assert cfg.model.name_or_path == "microsoft/phi-2" and not cfg.model.config
    with pytest.raises(OSError, match="microsoft/phi-2"):
        load_tokenizer(cfg.model)


def test_truthy_preset_loads_through_datasets(tmp_path):
    """The preset names the hub set; offline, loading it stops with a DataError naming the key and
    the set. The same code path reads a data set `datasets` can resolve (a local folder in its
    layout): rows, splits and the eval split as the preset asks."""
    cfg = compose(["dataset=truthy"])
    assert cfg.dataset.name == "jondurbin/truthy-dpo-v0.1"
    with pytest.raises(DataError, match="config key 'dataset.name' = 'jondurbin/truthy-dpo-v0.1'"):
        load_rows(cfg.dataset)
    folder = tmp_path / "truthy-like"
    folder.mkdir()
    rows = [{"system": "Be truthful.", "prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."}
            for i in range(20)]
    write_jsonl(folder / "train.jsonl", rows)
    cfg = compose(["dataset=truthy", f"dataset.name={folder}"])
    train, evals, train_src, eval_src, offset = load_rows(cfg.dataset)
    assert train + evals == rows  # every row, in order, through datasets.load_dataset
    assert (len(train), len(evals), offset) == (18, 2, 18)  # eval_size 0.1: the last 10%
    assert train_src == eval_src == f"{folder}[train]"
    with pytest.raises(DataError, match="config key 'dataset.train_split' = 'test'"):
        load_rows(compose(["dataset=truthy", f"dataset.name={folder}", "dataset.train_split=test"]).dataset)


def test_local_model_folder_through_name_or_path(tmp_path, tokenizer):
    from conftest import make_tiny_llama
    from dpo_sweep.models import load_policy

    make_tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = compose([f"model.name_or_path={tmp_path}"])
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg.model, tok, seed=0)
    assert model.config.hidden_size == 32 and tok.eos_token == "</s>"

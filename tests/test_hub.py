"""The hub presets compose and reach the real Hugging Face loading code (offline here, so it must
fail there, naming what it tried to load, after the config checks passed)."""

import pytest

from conftest import compose
from dpo_sweep.config import validate
from dpo_sweep.data import load_rows
from dpo_sweep.models import load_tokenizer


def test_phi2_preset_loads_through_transformers():
    cfg = compose(["model=phi2", "dataset=truthy"])
    validate(cfg)
    assert cfg.model.name_or_path == "microsoft/phi-2" and not cfg.model.config
    with pytest.raises(OSError, match="microsoft/phi-2"):
        load_tokenizer(cfg.model)


def test_truthy_preset_loads_through_datasets():
    cfg = compose(["dataset=truthy"])
    assert cfg.dataset.name == "jondurbin/truthy-dpo-v0.1"
    with pytest.raises(Exception, match="truthy-dpo-v0.1"):
        load_rows(cfg.dataset)


def test_local_model_folder_through_name_or_path(tmp_path, tokenizer):
    from conftest import make_tiny_llama
    from dpo_sweep.models import load_policy

    make_tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    cfg = compose([f"model.name_or_path={tmp_path}"])
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg.model, tok, seed=0)
    assert model.config.hidden_size == 32 and tok.eos_token == "</s>"

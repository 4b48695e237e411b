"""The SFT stage: what it trains on, that it trains, and its cache: a second trial loads the
weights the first one trained, and another SFT setting is another cache entry."""

import torch

from conftest import compose, make_tiny_llama
from dpo_sweep.batching import collate
from dpo_sweep.data import load_preference_data
from dpo_sweep.reference import autocast_for
from dpo_sweep.sft import apply_sft, sft_loss, targets

CPU = torch.device("cpu")


def setup(tokenizer, *overrides):
    cfg = compose(["dataset.builtin_size=40", "dataset.eval_size=8", "sft.steps=6", "sft.batch_size=4", *overrides])
    return cfg, load_preference_data(cfg.dataset, tokenizer, 128, 64).train


def test_targets_mix_chosen_and_rejected_answers(tokenizer):
    _, pairs = setup(tokenizer)
    assert [r.chosen_ids for r in targets(pairs, 0.0, 0)] == [p.chosen_ids for p in pairs]
    assert [r.chosen_ids for r in targets(pairs, 1.0, 0)] == [p.rejected_ids for p in pairs]
    half = targets(pairs, 0.5, 0)
    rejected = sum(r.chosen_ids == p.rejected_ids for r, p in zip(half, pairs))
    assert 0.25 * len(pairs) < rejected < 0.75 * len(pairs)
    assert half == targets(pairs, 0.5, 0) and all(r.chosen_ids == r.rejected_ids for r in half)


def test_sft_lowers_the_loss_on_its_rows(tokenizer, tmp_path):
    cfg, pairs = setup(tokenizer, "sft.steps=30", "sft.lr=3e-3")
    model = make_tiny_llama(tokenizer)
    batch = collate(targets(pairs, 0.0, 0), tokenizer.pad_token_id)
    with torch.no_grad():
        before = float(sft_loss(model, batch, len(pairs)))
    apply_sft(model, pairs, cfg.sft, tokenizer.pad_token_id, CPU, autocast_for(CPU, "fp32"), None)
    with torch.no_grad():
        after = float(sft_loss(model, batch, len(pairs)))
    assert after < 0.8 * before


def test_a_second_trial_loads_the_cached_weights_and_a_new_setting_is_a_new_entry(tokenizer, tmp_path):
    cfg, pairs = setup(tokenizer)
    args = (tokenizer.pad_token_id, CPU, autocast_for(CPU, "fp32"), str(tmp_path))
    first = make_tiny_llama(tokenizer)
    assert apply_sft(first, pairs, cfg.sft, *args) is False  # trained, then cached
    files = sorted(f.name for f in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("sft-") and files[0].endswith(".safetensors")
    assert files[1] == files[0] + ".sha256"  # its checksum
    second = make_tiny_llama(tokenizer)  # another trial: the same starting weights
    assert apply_sft(second, pairs, cfg.sft, *args) is True  # loaded
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(second.state_dict()["lm_head.weight"], make_tiny_llama(tokenizer).state_dict()["lm_head.weight"])
    changed, _ = setup(tokenizer, "sft.rejected_share=0.25")
    assert apply_sft(make_tiny_llama(tokenizer), pairs, changed.sft, *args) is False
    assert len(list(tmp_path.glob("sft-*.safetensors"))) == 2

"""LoRA: the reference is the base model (adapters off), and only adapter weights train."""

import os

import pytest
import torch
from torch.testing import assert_close

from conftest import compose
from dpo_sweep.data import collate
from dpo_sweep.logprobs import sequence_logps
from dpo_sweep.models import load_policy, load_tokenizer
from dpo_sweep.run import build_trainer, run_trial

pytest.importorskip("peft")

LORA = ["model.lora.enabled=true", "model.lora.r=4", "train.max_steps=4", "train.progress=false",
        "tracking.enabled=false", "optimizer.lr=1e-2",
        "sft.enabled=false"]  # the base as loaded: the reference must be exactly it (tests/test_sft.py: the SFT stage)


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_reference_is_the_base_model_and_only_adapters_change(tmp_path, monkeypatch, reference):
    monkeypatch.chdir(tmp_path)
    cfg = compose(LORA + [f"train.reference={reference}"])
    trainer, _ = build_trainer(cfg)
    base_cfg = compose(["train.progress=false"])
    base = load_policy(base_cfg.model, load_tokenizer(base_cfg.model), cfg.seed).eval()
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.fit()

    batch = collate(trainer.train_pairs[:4], trainer.pad_id)
    idx = list(range(4))
    ref_chosen, ref_rejected, _, _ = trainer.reference.logps(batch, "train", idx)
    with torch.no_grad():
        base_logps, _ = sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        policy_logps, _ = sequence_logps(trainer.policy, batch["input_ids"], batch["attention_mask"],
                                         batch["loss_mask"])
    assert_close(torch.cat([ref_chosen, ref_rejected]), base_logps, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-4)  # the adapters moved the policy

    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert {n for n, p in trainer.policy.named_parameters() if p.requires_grad} == changed
    assert trainer.history[-1]["train/rewards/margins"] != 0


@pytest.mark.parametrize("merge", ["false", "true"])
def test_saves_adapter_or_merged_model(tmp_path, monkeypatch, merge):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    run_trial(compose(LORA + ["train.save_model=true", f"model.lora.merge={merge}"]), out_dir=str(tmp_path / "run"))
    saved = os.listdir(tmp_path / "run" / "model")
    if merge == "true":
        assert "config.json" in saved and "adapter_config.json" not in saved
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
        assert not any("lora" in n for n, _ in model.named_parameters())
    else:
        assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved

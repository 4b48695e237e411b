"""Our trainer against TRL's DPOTrainer: same model, data order and settings, 10 steps, fp32."""

import pytest
import torch

from conftest import compose, make_tiny_llama, write_jsonl
from dpo_sweep.data import builtin_rows, collate_shared
from dpo_sweep.run import build_trainer

trl = pytest.importorskip("trl")

STEPS, BATCH, LR, BETA = 10, 4, 1e-3, 0.1
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("parity")
    model_dir = tmp / "model"
    make_tiny_llama(tokenizer, seed=3, hidden=48).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = builtin_rows(STEPS * BATCH + 8, seed=7)
    train = write_jsonl(tmp / "train.jsonl", rows[: STEPS * BATCH])
    evals = write_jsonl(tmp / "eval.jsonl", rows[STEPS * BATCH :])
    return tmp, str(model_dir), train, evals, rows[: STEPS * BATCH]


def ours(model_dir, train, evals, loss="sigmoid"):
    cfg = compose([
        f"model.name_or_path={model_dir}", "dataset=local",
        f"dataset.path={train}", f"dataset.eval_path={evals}", f"beta={BETA}", f"optimizer.lr={LR}",
        f"loss={loss}", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}", "train.lr_schedule=constant",
        "train.warmup_ratio=0", "train.shuffle=false", "train.group_by_length=false", "train.max_grad_norm=1.0",
        "train.precision=fp32", "train.device=cpu", "train.progress=false", "tracking.enabled=false",
    ])
    trainer, _ = build_trainer(cfg)
    assert trainer.collate is collate_shared  # the default, fastest layout: one row per pair
    trainer.fit()
    return [{k[len("train/"):]: v for k, v in h.items()} for h in trainer.history]


def theirs(tmp, model_dir, rows, loss_type="sigmoid", label_smoothing=0.0):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp / f"trl-{loss_type}"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, loss_type=[loss_type], label_smoothing=label_smoothing, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
        use_cpu=True, gradient_checkpointing=False, train_sampling_strategy="sequential", seed=0,
        disable_tqdm=True, optim="adamw_torch", max_length=1024,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_list(rows)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h and "rewards/chosen" in h]


@pytest.mark.slow
@pytest.mark.parametrize("loss,label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_per_step_metrics_match_trl(setup, loss, label_smoothing):
    """conf/loss/<loss>.yaml against TRL's loss_type of the same name (robust.yaml has eps 0.1)."""
    tmp, model_dir, train, evals, rows = setup
    a = ours(model_dir, train, evals, loss)
    b = theirs(tmp, model_dir, rows, loss, label_smoothing)
    assert len(a) == len(b) == STEPS
    for step, (x, y) in enumerate(zip(a, b), start=1):
        for key in METRICS:
            assert x[key] == pytest.approx(y[key], abs=1e-4), f"step {step}: {key} ours {x[key]} TRL {y[key]}"
    # The run moved: the policy is no longer the reference.
    assert a[-1]["rewards/margins"] != 0.0

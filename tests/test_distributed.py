"""`torchrun --nproc_per_node=2 -m dpo_sweep` (DDP over gloo on the CPU) against one process with
the same global batch: the same per-step losses and metrics."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import FAST
from mlflow.tracking import MlflowClient

STEPS = 5
ARGS = [*FAST, f"train.max_steps={STEPS}", "train.batch_size=8", "train.grad_accum=2", "train.eval_every=0",
        "train.progress=false", "train.device=cpu", "optimizer.lr=2e-3"]


def run(tmp_path, name, launcher, extra=()):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = launcher + ["-m", "dpo_sweep", *ARGS, *extra, f"hydra.run.dir={tmp_path}/{name}", f"tracking.uri={uri}",
                      f"tracking.run_name={name}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dpo-sweep")
    (found,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    history = {key: [m.value for m in sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)]
               for key in ("train/loss", "train/rewards/margins", "train/grad_norm")}
    return found, history


TORCHRUN = (shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run").split()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    # 10 eval pairs are one eval batch: one rank evaluates nothing and still joins the reduction.
    single, h1 = run(tmp_path, "single", [sys.executable], ["dataset.eval_size=10"])
    ddp, h2 = run(tmp_path, "ddp", TORCHRUN + ["--nproc_per_node=2", "--master_port=29533"], ["dataset.eval_size=10"])
    for key in h1:
        assert len(h1[key]) == len(h2[key]) == STEPS
        assert h2[key] == pytest.approx(h1[key], abs=1e-5), key
    assert ddp.data.metrics["eval/loss"] == pytest.approx(single.data.metrics["eval/loss"], abs=1e-5)
    # Only rank 0 logged: one MLflow run, one run folder.
    assert os.listdir(tmp_path / "ddp" / ".hydra")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp", "mlartifacts", "outputs", "single"]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path, reference):
    from transformers import AutoModelForCausalLM

    # No-grad forwards before and between training steps: an eval every 2 steps and (precomputed)
    # the sharded policy's own reference pass (the single run's cache is removed first).
    ref = [f"train.reference={reference}", "train.eval_every=2"]
    single, h1 = run(tmp_path, "single", [sys.executable], ref)
    shutil.rmtree(tmp_path / "outputs" / "cache", ignore_errors=True)
    fsdp, h2 = run(tmp_path, "fsdp", TORCHRUN + ["--nproc_per_node=2", "--master_port=29534"],
                   ref + ["train.fsdp=true", "train.save_model=true"])
    for key in h1:
        assert h2[key] == pytest.approx(h1[key], abs=1e-5), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")  # gathered whole
    assert model.config.hidden_size == 64


def test_fsdp_outside_torchrun_is_a_clear_error(tmp_path):
    from conftest import compose
    from dpo_sweep.config import ConfigError
    from dpo_sweep.run import run_trial

    cfg = compose(["train.fsdp=true", "train.max_steps=1", "train.progress=false", "tracking.enabled=false"])
    with pytest.raises(ConfigError, match="config key 'train.fsdp' = True: expected a run under torchrun"):
        run_trial(cfg, out_dir=str(tmp_path))

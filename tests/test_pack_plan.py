"""Which trials may share a process (`hydra.sweeper.pack`): configs composed from the real conf/,
planned into packs and singles, each single with a reason that names a key; and the setting
itself, refused below 1 before anything is written."""

import os
import subprocess
import sys

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import compose
from dpo_sweep.config import ConfigError
from dpo_sweep.packing.plan import (check_pack, differing_keys, is_free, is_packable, label, plan_packs, signature,
                                    why_not_packable)
from dpo_sweep.paths import conf_dir
from dpo_sweep.preflight import check_sweep
from dpo_sweep.sweep.settings import SweepSettings

LORA = ["model.lora.enabled=true"]
DIFFERENT_TRAINING = [["beta=0.05"], ["beta=0.5", "optimizer.lr=1e-3"], ["loss=ipo"],
                      ["loss=cdpo", "optimizer.weight_decay=0.01", "model.lora.r=8", "model.lora.alpha=16"]]


def lora(*overrides):
    return compose([*LORA, *overrides])


def test_trials_that_differ_in_packable_keys_pack_together():
    cfgs = [lora(*o) for o in DIFFERENT_TRAINING]
    assert plan_packs(cfgs, 4) == ([[0, 1, 2, 3]], [])
    assert differing_keys(cfgs) == ["beta", "loss.label_smoothing", "loss.length_normalize", "loss.name",
                                    "model.lora.alpha", "model.lora.r", "optimizer.lr", "optimizer.weight_decay"]
    assert len({signature(c) for c in cfgs}) == 1
    check_pack(cfgs)  # no error


def test_where_a_trial_reports_and_resumes_does_not_keep_it_out():
    cfgs = [lora("sweep.trial_number=0", "tracking.run_name=a"),
            lora("sweep.trial_number=1", "tracking.run_name=b", "train.resume=true", "train.progress=false",
                 "sweep.pack=[2]")]
    assert plan_packs(cfgs, 4) == ([[0, 1]], [])
    assert is_free("tracking.uri") and is_free("train.resume") and not is_free("train.device")
    assert is_packable("loss.name") and is_packable("beta") and not is_packable("seed")


def test_a_trial_that_trains_differently_runs_alone_with_the_key_named():
    cfgs = [lora("beta=0.1"), lora("beta=0.3"), lora("train.batch_size=4"), lora("beta=0.5")]
    packs, singles = plan_packs(cfgs, 4, numbers=[10, 11, 12, 13])
    assert packs == [[0, 1, 3]]
    assert singles == [(2, "it differs from the pack of trials 10,11,13 in train.batch_size: 4 vs 8")]
    with pytest.raises(ConfigError, match=r"config key 'train.batch_size' = 4 in trial 1 but 8 in trial 0"):
        check_pack([cfgs[0], cfgs[2]])


def test_two_trials_apart_name_the_value_no_other_shares():
    packs, singles = plan_packs([lora("train.batch_size=4"), lora("train.max_length=256")], 4)
    assert packs == []
    assert singles == [(0, "no other trial of this batch shares its train.batch_size=4"),
                       (1, "no other trial of this batch shares its train.batch_size=8")]
    assert plan_packs([lora()], 4) == ([], [(0, "no other trial of this batch can be packed")])


@pytest.mark.parametrize("overrides, reason", [
    ([], "packing trains LoRA adapters over a frozen base: set model.lora.enabled=true"),
    ([*LORA, "model.lora.dropout=0.1"], "random dropout masks: a packed trial would not reproduce alone"),
    ([*LORA, "trainer=trl"], "packed trials train in dpo_sweep's own loop: set trainer=dpo_sweep"),
    ([*LORA, "train.fsdp=true"], "a pack trains in one process on one device: set train.fsdp=false"),
])
def test_configs_that_cannot_be_packed_at_all(overrides, reason):
    cfg = compose(overrides)
    assert reason in why_not_packable(cfg)
    packs, singles = plan_packs([cfg, lora()], 4)
    assert packs == [] and reason in singles[0][1]
    with pytest.raises(ConfigError, match="config key '(model.lora|trainer|train.fsdp)"):
        check_pack([lora(), cfg])


def test_under_torchrun_nothing_packs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "launched under torchrun (WORLD_SIZE=2)" in why_not_packable(lora())
    with pytest.raises(ConfigError, match="trial 0 cannot be packed: launched under torchrun"):
        check_pack([lora()])


def test_the_pack_size_caps_a_pack():
    cfgs = [lora(f"beta={b}") for b in (0.1, 0.2, 0.3, 0.4, 0.5)]
    assert plan_packs(cfgs, 4, numbers=range(5, 10)) == (
        [[0, 1, 2, 3]], [(4, "the pack of trials 5-8 is full (hydra.sweeper.pack=4)")])
    assert plan_packs(cfgs, 2) == ([[0, 1], [2, 3]], [(4, "the pack of trials 2,3 is full (hydra.sweeper.pack=2)")])
    assert plan_packs(cfgs[:2], 1) == ([], [(0, "hydra.sweeper.pack=1: one trial a process"),
                                            (1, "hydra.sweeper.pack=1: one trial a process")])


def test_packs_keep_asking_order_and_signatures_group_apart():
    cfgs = [lora("beta=0.1"), lora("seed=1"), lora("beta=0.2"), lora("seed=1", "beta=0.3")]
    assert plan_packs(cfgs, 4) == ([[0, 2], [1, 3]], [])
    assert label([0, 1, 2, 3]) == "0-3" and label([4, 6]) == "4,6" and label([7]) == "7"


def test_the_sweepers_config_with_the_hydra_node_plans_as_the_jobs_config():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = GlobalHydra.instance().hydra.compose_config("config", [*LORA, "beta=0.1,0.5"],
                                                             run_mode=RunMode.MULTIRUN)
        cfgs = [loader.load_sweep_config(master, [*LORA, f"beta={b}", f"sweep.trial_number={n}"])
                for n, b in enumerate((0.1, 0.5))]
    assert "hydra" in cfgs[0]
    assert signature(cfgs[0]) == signature(OmegaConf.masked_copy(cfgs[1], [k for k in cfgs[1] if k != "hydra"]))
    assert plan_packs(cfgs, 2) == ([[0, 1]], [])


# ---------------------------------------------------------------------------- the setting


def sweeper_settings(pack):
    return OmegaConf.create({"n_trials": None, "n_jobs": 1, "pack": pack, "sampler": {"name": "tpe"},
                             "pruner": {"name": "median"}})


def test_pack_is_read_and_checked():
    assert SweepSettings.from_config(sweeper_settings(4)).pack == 4
    assert SweepSettings.from_config(OmegaConf.create({"sampler": {"name": "tpe"}, "pruner": {"name": "none"}})).pack == 1
    with pytest.raises(ConfigError, match=r"^config key 'hydra.sweeper.pack' = 0: expected an integer >= 1"):
        SweepSettings.from_config(sweeper_settings(0))


def test_preflight_refuses_pack_0():
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        config = GlobalHydra.instance().hydra.compose_config("config", ["beta=0.1,0.5", "hydra.sweeper.pack=0"],
                                                             run_mode=RunMode.MULTIRUN)
        with pytest.raises(ConfigError, match="config key 'hydra.sweeper.pack' = 0"):
            check_sweep(config)


def test_pack_0_stops_the_command_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", "beta=0.1,0.5", "hydra.sweeper.pack=0", "-m"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == ["error: config key 'hydra.sweeper.pack' = 0: expected an integer >= 1 (1: each trial its own "
                     "run)"]
    assert list(tmp_path.iterdir()) == []

"""dpo-sweep: DPO training with Hydra configs, Optuna sweeps and MLflow tracking."""

__version__ = "0.1.0"

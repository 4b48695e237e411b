"""dpo-sweep's Hydra sweeper over Optuna 5 (`hydra/sweeper=dpo_optuna`, the default for `-m`).

A thin shell that Hydra discovers in the `hydra_plugins` namespace package; the logic lives in
`dpo_sweep.sweep` (the package). Nothing heavy is imported here: Hydra imports these modules at every start-up.
"""

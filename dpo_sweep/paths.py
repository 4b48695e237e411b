"""Where the Hydra configs live: `dpo_sweep/conf` in an installed wheel, `conf/` in a checkout."""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def conf_dir() -> str:
    packaged = os.path.join(_HERE, "conf")
    return packaged if os.path.isdir(packaged) else os.path.join(os.path.dirname(_HERE), "conf")

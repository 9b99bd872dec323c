"""motab-jax main job: `python run.py [--config=configs/<name>.py] [--config.key=value ...]`.

Without --config it runs the embedded demo (configs/demo.py), which needs no network.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app
from absl import logging as absl_logging
from ml_collections import config_flags

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", default=DEMO_CONFIG, help_string="ml_collections config file "
                                          "(default: the embedded demo)", lock_config=True)


def main(argv: list[str]) -> int:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # library chatter (Orbax, XLA); our own log stays at INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    ours = logging.getLogger("motab_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    config = _CONFIG.value
    from motab_jax.pipeline import run_pipeline
    from motab_jax.pipeline.runner import ConfigError

    try:
        summaries = run_pipeline(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\nfinished stages: " + ", ".join(summaries) + f"  (outputs in {config.run_dir})")
    return 0


if __name__ == "__main__":
    app.run(main)

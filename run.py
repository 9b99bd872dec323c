"""motab-jax main job: `python run.py [--config=configs/<name>.py] [--config.key=value ...]`.

Without --config it runs the embedded demo (configs/demo.py), which needs no network.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from ml_collections import config_flags

from configs import demo

_CONFIG = config_flags.DEFINE_config_file("config", default=None, help_string="ml_collections config file",
                                          lock_config=True)


def main(argv: list[str]) -> int:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    config = _CONFIG.value if _CONFIG.value is not None else demo.get_config()
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

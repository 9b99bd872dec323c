"""motab-jax main job: `python run.py [--config=configs/<name>.py] [--config.key=value ...]`.

Without --config it runs the embedded demo (configs/demo.py), which needs no network.
"""

from __future__ import annotations

import logging
import os
import sys
import time

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
    from motab_jax.pipeline import ConfigError, run_pipeline
    from motab_jax.text.tokenizer import VocabularyMismatchError

    start = time.monotonic()
    try:
        summaries = run_pipeline(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionError, MemoryError, VocabularyMismatchError) as e:
        # Missing checkpoints or data, an unreachable hub, caches that do not fit: the message says what to do.
        print(f"error: {e}\n(the traceback is in {os.path.join(config.run_dir, 'run.log')}; rerun the same command "
              "to continue)", file=sys.stderr)
        return 1
    results = os.path.join(config.run_dir, "results.md")
    print("\n" + open(results, encoding="utf-8").read())
    print(f"finished stages: {', '.join(summaries)} in {time.monotonic() - start:.0f} s; outputs in {config.run_dir} "
          f"(results.md, run.log, config.json)")
    return 0


if __name__ == "__main__":
    app.run(main)

"""motab-jax main job: `python run.py [--config=configs/<name>.py] [--config.key=value ...]`.

Without --config it runs the embedded demo (configs/demo.py), which needs no network.

A bad input or environment problem (any `motab_jax.errors.MotabInputError`, a bad command line) ends the job with
one `error: <message>` line and a non-zero exit (2: the configuration or command line, 1: the rest); the
traceback goes to <run_dir>/run.log. Ctrl-C (SIGINT) and SIGTERM stop it with one line saying how to resume;
finished work (records, checkpoints, finished stages) is kept either way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
EXIT_CONFIG, EXIT_INPUT = 2, 1  # a bad configuration / command line; any other input or environment problem


def _define_config_flag():
    """The --config flag. Without --config, ml_collections applies the --config.* overrides to the default config
    right here, so an override it rejects fails here."""
    try:
        return config_flags.DEFINE_config_file("config", default=DEMO_CONFIG, help_string="ml_collections config "
                                               "file (default: the embedded demo)", lock_config=True)
    except Exception as e:  # noqa: BLE001 - any failure here is the command line's; _command_line_error says which
        sys.exit(_command_line_error(e))


def _config_file(argv: list[str]) -> str:
    """The --config value of `argv` (the demo when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return DEMO_CONFIG


def _load_config(value: str):
    """The config a --config value names ("file.py" or "file.py:argument"), as ml_collections loads it."""
    path, _, argument = value.partition(":") if not os.path.exists(value) else (value, "", "")
    spec = importlib.util.spec_from_file_location("motab_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def _describe(error: BaseException, argv: list[str]) -> str:
    """What is wrong with the command line or the --config file, for one error line."""
    value = _config_file(argv)
    path = value if os.path.exists(value) else value.partition(":")[0]
    if not Path(path).is_file():
        return f"--config={value}: no such file; give a config file, e.g. --config=configs/demo.py"
    try:
        config = _load_config(value)
    except SyntaxError as e:
        return f"--config={value}: line {e.lineno}: {e.msg}"
    except Exception as e:  # noqa: BLE001 - the user's config file failed: name the line
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
                 if os.path.abspath(f.filename) == os.path.abspath(path)]
        at = f"line {lines[-1]}: " if lines else ""
        if isinstance(e, AttributeError) and "get_config" in str(e):
            return f"--config={value}: defines no get_config() returning an ml_collections.ConfigDict"
        return f"--config={value}: {at}{type(e).__name__}: {e}"
    from motab_jax.pipeline.inputs import unknown_field_message

    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        message = unknown_field_message(config, match.group(1)) if match else None
        if message:
            return f"--config.{match.group(1)}: {message[message.index(':') + 2:]}"
    if isinstance(error, flags.Error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _command_line_error(error: BaseException) -> int:
    print(f"error: {_describe(error, sys.argv)}", file=sys.stderr)
    return EXIT_CONFIG


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, then the --config file loaded: any failure is one error line."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("run_dir")  # a --config file that failed to load raises on first use
    except Exception as e:  # noqa: BLE001 - a bad flag, override or config file; _describe says which
        sys.exit(_command_line_error(e))
    return rest


_stopped_by: list[int] = []  # the signal that stopped the job


def _stop(signum: int, frame) -> None:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`): unwind, so finally-blocks run and one line is
    printed. Installed for SIGINT too because a library running an asyncio loop (Orbax) replaces Python's default
    SIGINT handler, and not a custom one, for the loop's duration: there Ctrl-C could be swallowed."""
    del frame
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def _note_in_run_log(run_dir: str, message: str) -> None:
    log_path = Path(run_dir) / "run.log"
    if log_path.is_file():
        try:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR {message}\n")
        except OSError:
            pass  # the run log is a convenience; the message was printed


def _log_hint(run_dir: str, start: float) -> str:
    """Where the traceback is, when this job wrote its run.log (not when it failed before the run directory)."""
    log_path = Path(run_dir) / "run.log"
    try:
        written = log_path.is_file() and log_path.stat().st_mtime >= start - 1
    except OSError:
        written = False
    return f" (the traceback is in {log_path})" if written else ""


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
    run_dir = str(config.run_dir)
    signal.signal(signal.SIGTERM, _stop)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job started with SIGINT ignored
        signal.signal(signal.SIGINT, _stop)
    from motab_jax.errors import MotabInputError, environment_problem
    from motab_jax.pipeline import ConfigError, run_pipeline

    start = time.time()
    try:
        summaries = run_pipeline(config)
        if _stopped_by:  # a stop that arrived where it could not be raised (swallowed inside a library): honour it
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we print would be a traceback
        name = signal.Signals(_stopped_by[-1]).name if _stopped_by else "SIGINT"
        message = (f"stopped by {name}; finished work (records, checkpoints, finished stages) is kept in {run_dir}: "
                   "rerun the same command to continue")
        _note_in_run_log(run_dir, message)
        print(f"\n{message}", file=sys.stderr)
        code = 128 + (_stopped_by[-1] if _stopped_by else signal.SIGINT)
        # Leave without the interpreter's teardown: interrupted mid-computation, XLA's threads can crash it
        # (a segfault after the message, measured here in 3 of 7 interrupt points of the models stage).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (MotabInputError, FileNotFoundError, ConnectionError, MemoryError, OSError) as e:
        # Missing checkpoints or data, an unreachable hub, caches that do not fit, a full or read-only disk: the
        # message says what to do. Any other OSError is not the user's to fix: it keeps its traceback.
        problem = e if isinstance(e, (MotabInputError, FileNotFoundError, ConnectionError, MemoryError)) \
            else environment_problem(e)
        if problem is None:
            raise
        print(f"error: {problem}{_log_hint(run_dir, start)}", file=sys.stderr)
        return EXIT_INPUT
    results = os.path.join(run_dir, "results.md")
    print("\n" + open(results, encoding="utf-8").read())
    print(f"finished stages: {', '.join(summaries)} in {time.time() - start:.0f} s; outputs in {run_dir} "
          f"(results.md, run.log, config.json)")
    return 0


if __name__ == "__main__":
    try:
        _CONFIG = _define_config_flag()
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # before the job started (imports, flag parsing): nothing was written
        print("\nstopped by SIGINT before the job started; nothing was written", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)

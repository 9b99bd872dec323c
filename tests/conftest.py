"""Test-wide environment: offline hub, 8 host CPU devices (set before jax is imported)."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole run, shared with the run.py processes tests start: many tests build
# the same tiny models, engines and train steps, and the fixture below drops JAX's in-memory programs per module
# (run.py uses a set JAX_COMPILATION_CACHE_DIR instead of its run directory's jax_cache).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="motab-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: one pytest process compiles thousands of programs,
    and each keeps memory mappings of its machine code; without this a full run can exhaust the process's
    mappings (vm.max_map_count) and crash inside the XLA compiler."""
    yield
    jax.clear_caches()

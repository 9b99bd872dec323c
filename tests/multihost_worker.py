"""One process of the 2-process test in test_multihost.py (not a test module itself).

Usage: python tests/multihost_worker.py PROCESS_ID PORT EXPORT_DIR RESULT_FILE
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(process_id: int, port: str, export_dir: str, result_file: str) -> None:
    from jax.experimental import multihost_utils

    import motab_jax
    from motab_jax.models.sharding import MeshConfig, initialize_distributed, logical_sharding, make_mesh

    initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
    mesh = make_mesh(MeshConfig(data=2, tensor=4))  # spans both processes' devices
    folder = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "qwen3_untied")
    model, tokenizer = motab_jax.load(folder, dtype="float32", mesh=mesh)
    ids = np.tile(np.load(os.path.join(folder, "expected_logits.npz"))["input_ids"], (2, 1))
    sharding = logical_sharding(mesh, ("batch", "length"), ids.shape)
    global_ids = jax.make_array_from_callback(ids.shape, sharding, lambda index: ids[index])
    logits = jax.jit(lambda m, x: m(x))(model, global_ids)
    np.save(result_file, multihost_utils.process_allgather(logits, tiled=True))
    motab_jax.export_hf(model, tokenizer, export_dir)  # collective gather; process 0 writes


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])

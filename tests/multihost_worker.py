"""One process of the 2-process test in test_multihost.py (not a test module itself).

Usage: python tests/multihost_worker.py PROCESS_ID PORT EXPORT_DIR RESULT_FILE [train]
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # as a worker process; importing this module (for train_losses) changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if __name__ == "__main__":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")


def train_losses(mesh, process_index: int = 0, process_count: int = 1, steps: int = 3) -> list[float]:
    """A few SFT steps of a tiny model on a (data=2, fsdp=2, tensor=2) mesh; each process feeds its rows."""
    from motab_jax.data import BatchIterator, Example, SFTDataset, build_sft_rows
    from motab_jax.models import ModelConfig, init_random
    from motab_jax.text import byte_level_tokenizer
    from motab_jax.train.optimizer import OptimizerConfig, make_optimizer
    from motab_jax.train.step import StepConfig, init_train_state, make_train_step
    from motab_jax.train.trainer import place_batch

    tok = byte_level_tokenizer()
    cfg = ModelConfig("qwen3", vocab_size=264, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, qk_norm=True, logits_vocab_size=len(tok))
    model = init_random(cfg, seed=0, mesh=mesh)
    examples = [Example(str(i), f"{i}+{i}", f"={2 * i}.", prompt_rendered=True) for i in range(64)]
    rows, _ = build_sft_rows(examples, tok, 24, apply_chat_template=False)
    batches = BatchIterator(SFTDataset(rows), 8, seed=0, process_index=process_index, process_count=process_count)
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10)
    graphdef, state = init_train_state(model, tx)
    step = make_train_step(graphdef, tx, StepConfig(micro_batches=2, chunk_size=8))
    losses = []
    for batch, _ in zip(batches, range(steps)):
        state, metrics = step(state, place_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


def main(process_id: int, port: str, export_dir: str, result_file: str, mode: str = "model") -> None:
    from jax.experimental import multihost_utils

    import motab_jax
    from motab_jax.models.sharding import MeshConfig, initialize_distributed, logical_sharding, make_mesh

    initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
    if mode == "train":
        mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        np.save(result_file, np.asarray(train_losses(mesh, process_id, 2)))
        return
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
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], *sys.argv[5:])

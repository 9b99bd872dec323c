"""Shared output helper of the benchmark scripts."""

from __future__ import annotations


def print_table(rows: list[tuple[str, str]]) -> None:
    """A two-column Markdown table (measure, value), ready to paste into the README."""
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s, measured by a read + write of 512 MiB (the HBM floor's unit)."""
    import time

    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 1024, 1024), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(10):
        y = f(x)
    y.block_until_ready()
    return 2 * x.nbytes * 10 / (time.perf_counter() - start)

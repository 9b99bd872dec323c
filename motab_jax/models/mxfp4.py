"""MXFP4 checkpoints (gpt-oss as released): expert weights dequantized while they are placed.

The released gpt-oss checkpoints store each expert projection `P` as `P_blocks` uint8 [E, out, in / 32, 16]
(32 FP4 E2M1 values per 16 bytes, the LOW nibble first) and `P_scales` uint8 [E, out, in / 32] (E8M0, bias
127): w = ldexp(FP4[nibble], scale - 127), laid out [E, out, in] and then transposed to the Hugging Face
parameter layout [E, in, out]. `Mxfp4Tensors` presents such a checkpoint with the dequantized names, and
dequantizes only the experts a device asks for (`get_rows`), so no process ever holds a whole layer's
experts in floating point (gpt-oss-120b: 8.5 GB per layer in float32).
"""

from __future__ import annotations

import numpy as np

from motab_jax.errors import MotabInputError

FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [..., out, G, 16], scales uint8 [..., out, G] -> float32 [..., in = 32 G, out]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise MotabInputError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair up (expected "
                              "blocks [..., out, G, 16] and scales [..., out, G])")
    blocks = np.asarray(blocks, np.uint8)
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # low nibble = even index
    values = values.reshape(*scales.shape, 32)
    values = np.ldexp(values, np.asarray(scales, np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*scales.shape[:-1], -1), -1, -2)


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., in, out] -> (blocks, scales) in the released layout; round to the nearest FP4 value with the
    shared exponent chosen so the block's largest magnitude fits (for tests and for writing tiny checkpoints)."""
    w = np.swapaxes(np.asarray(weight, np.float32), -1, -2)  # [..., out, in]
    *lead, inner = w.shape
    if inner % 32:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of 32, got {inner}")
    groups = w.reshape(*lead, inner // 32, 32)
    top = np.abs(groups).max(axis=-1)
    # The largest FP4 magnitude is 6 = 1.5 * 2^2: pick the exponent that maps the block maximum to <= 6.
    exponent = np.where(top > 0, np.ceil(np.log2(np.maximum(top, 1e-30) / 6.0)), -127).astype(np.int32)
    exponent = np.clip(exponent, -127, 127)
    scaled = groups / np.ldexp(1.0, exponent)[..., None]
    codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(axis=-1).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exponent + 127).astype(np.uint8)


class Mxfp4Tensors:
    """A tensor source (see `loading.TensorSource`) that shows `P_blocks` + `P_scales` pairs as `P`."""

    def __init__(self, source):
        self._source = source
        names = source.names()
        self._quantized = {n[: -len(BLOCKS)] for n in names
                           if n.endswith(BLOCKS) and n[: -len(BLOCKS)] + SCALES in names}
        self._names = (names - {q + s for q in self._quantized for s in (BLOCKS, SCALES)}) | self._quantized

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._quantized:
            return tuple(self._source.shape(name))
        *lead, out, groups, _ = self._source.shape(name + BLOCKS)
        return (*lead, groups * 32, out)

    def get(self, name: str) -> np.ndarray:
        if name not in self._quantized:
            return self._source.get(name)
        return dequantize(self._source.get(name + BLOCKS), self._source.get(name + SCALES))

    def get_rows(self, name: str, rows: slice) -> np.ndarray:
        """`get(name)[rows]`, dequantizing only those rows (experts) of a quantized tensor."""
        if name not in self._quantized:
            return self._source.get(name)[rows]
        return dequantize(self._source.get(name + BLOCKS)[rows], self._source.get(name + SCALES)[rows])


def is_mxfp4(hf_config: dict) -> bool:
    return (hf_config.get("quantization_config") or {}).get("quant_method") == "mxfp4"

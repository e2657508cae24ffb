"""Encoded blocks of float64 numbers: timestamps and values of compacted chunks.

The numbers go through pcodec (`pcodec` on PyPI, the Rust codec with Python bindings, lossless
for every float64 bit pattern including -0.0 and subnormals). Why pcodec rather than Gorilla's
delta-of-delta and XOR encoding written here:

- the data this gateway stores are mostly decimals (temperatures with two digits, setpoints),
  counters and on/off states. XOR of two neighbouring decimals such as 21.37 and 21.38 leaves
  ~40 meaningful mantissa bits, so Gorilla spends 5-7 bytes on each; pcodec finds that the values
  are (nearly) multiples of 0.01, stores the multiples with delta coding and the exact bits
  back as a small correction: measured on one hour at 1 Hz, 0.6-1.0 byte per temperature, 0.4
  per counter, 0.1 per on/off state, values bit for bit (`bench/telemetry_storage_bench.py`);
- timestamps from ``time.time()`` carry sub-millisecond jitter that no delta-of-delta removes
  (~1.8 bytes each); they are stored once per group of series that share them (`compaction`);
- encoding runs at ~15 million numbers a second and decoding at ~100 million on one core here,
  in native code, so a Python loop never touches each number.

A block is one version byte and one pcodec "standalone" file. The version byte lets a later
release read the blocks an earlier one wrote.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from pcodec import ChunkConfig, standalone

FloatArray = npt.NDArray[np.float64]

_VERSION_PCODEC: Final = b"\x01"
_CONFIG: Final = ChunkConfig()


class CorruptBlock(ValueError):
    """Bytes that are not a block this version can read (the message says what is wrong)."""


def encode(numbers: FloatArray) -> bytes:
    """Lossless bytes of a 1-D float64 array (at least one number)."""
    if numbers.ndim != 1 or numbers.dtype != np.float64 or len(numbers) == 0:
        raise ValueError("encode takes a non-empty 1-D float64 array")
    packed = standalone.simple_compress(np.ascontiguousarray(numbers), _CONFIG)
    return _VERSION_PCODEC + bytes(packed)


def decode(block: bytes, count: int) -> FloatArray:
    """The ``count`` numbers `encode` made ``block`` from, bit for bit."""
    if block[:1] != _VERSION_PCODEC:
        raise CorruptBlock(f"unknown block version {block[:1]!r}")
    try:
        numbers = standalone.simple_decompress(block[1:])
    except (RuntimeError, ValueError) as exc:
        raise CorruptBlock(f"undecodable block: {exc}") from exc
    if numbers.dtype != np.float64 or len(numbers) != count:
        raise CorruptBlock(f"block holds {len(numbers)} {numbers.dtype} numbers, expected {count}")
    return np.asarray(numbers, dtype=np.float64)

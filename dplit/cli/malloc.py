"""glibc malloc at `dplit` start-up, on request: a fixed mmap threshold, so that freed large tensors go back to the
kernel.

glibc serves a block at or above its mmap threshold with its own mapping (returned to the kernel when freed) and
smaller ones from the heap. By default the threshold is dynamic: freeing a mapped block raises it to that block's size
(up to 32 MiB), after which blocks of that size come from the heap and, once freed, stay resident, fragmented. A DP
run's varying temporaries (ghost clipping's, sized by each Poisson batch) push it up: `configs/mnist_dp.yaml` held
about 1.9x the resident memory of `mnist_nodp.yaml`, memory that was freed but kept (docs/scale/README.md, section 6).
A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic one off) keeps RSS at live memory
(1 MiB: `mnist_dp.yaml` peak RSS 1189 MB instead of 1486 MB). Only the allocator changes: no numerical result does.
It is NOT the default: every large tensor then costs a fresh mapping and its page faults, measured on MnistCNN at
+19-37% time with 64 KiB (ghost clipping, 2 threads) and +36-108% with 1 MiB (ghost and book-keeping, 1 thread)
(section 6 of docs/scale/README.md), against the < 3% a default would need.

``DPLIT_MALLOC_MMAP_THRESHOLD``: the threshold in bytes (e.g. 1048576); unset, empty or ``off``: malloc is left
alone. glibc's own ``MALLOC_MMAP_THRESHOLD_``, when set, wins (dplit then does nothing). Elsewhere than glibc (macOS,
musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

ENV = "DPLIT_MALLOC_MMAP_THRESHOLD"
SUGGESTED_THRESHOLD = 1 << 20
"""1 MiB: the value measured on `mnist_dp.yaml` (RSS like the non-DP run's); opt-in, see the module docstring."""
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_THRESHOLD = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


def threshold_from_env(environ: Mapping[str, str]) -> int | None:
    """The threshold ``DPLIT_MALLOC_MMAP_THRESHOLD`` asks for (None: leave malloc alone).

    Raises:
        ValueError: the value is neither ``off`` nor a number of bytes in [1, 32 MiB].
    """
    if environ.get("MALLOC_MMAP_THRESHOLD_") is not None:  # the user's glibc setting
        return None
    raw = environ.get(ENV, "").strip().lower()
    if raw in ("", "off", "0", "false", "no", "none"):
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_THRESHOLD:
        raise ValueError(
            f"{ENV}={environ[ENV]!r}: expected a number of bytes between 1 and {MAX_THRESHOLD} (e.g. 1048576), "
            "or `off` to keep glibc's default (dynamic) mmap threshold"
        )
    return value


def tune_malloc(environ: Mapping[str, str] = os.environ) -> int | None:
    """Fix glibc's mmap threshold if ``DPLIT_MALLOC_MMAP_THRESHOLD`` asks; returns the value set (None: unchanged)."""
    value = threshold_from_env(environ)
    if value is None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return value if libc.mallopt(M_MMAP_THRESHOLD, value) == 1 else None


__all__ = ["ENV", "SUGGESTED_THRESHOLD", "threshold_from_env", "tune_malloc"]

"""glibc malloc at `dplit` start-up: a fixed mmap threshold, so that freed large tensors go back to the kernel.

glibc serves a block at or above its mmap threshold with its own mapping (returned to the kernel when freed) and
smaller ones from the heap. By default the threshold is dynamic: freeing a mapped block raises it to that block's size
(up to 32 MiB), after which blocks of that size come from the heap and, once freed, stay resident, fragmented. A DP
run's varying temporaries (ghost clipping's, sized by each Poisson batch) push it up: `configs/mnist_dp.yaml` held
about 1.9x the resident memory of `mnist_nodp.yaml`, memory that was freed but kept (docs/scale/README.md, section 6).
A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic one off) keeps RSS at live memory.
Only the allocator changes: no numerical result does.

``DPLIT_MALLOC_MMAP_THRESHOLD``: the threshold in bytes (default :data:`DEFAULT_THRESHOLD`), or ``off`` to leave
malloc alone. glibc's own ``MALLOC_MMAP_THRESHOLD_``, when set, wins (dplit then does nothing). Elsewhere than glibc
(macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

ENV = "DPLIT_MALLOC_MMAP_THRESHOLD"
DEFAULT_THRESHOLD = 1 << 20
"""1 MiB: RSS of a `mnist_dp.yaml` run like the non-DP run's, at no measurable time cost (docs/scale, section 6)."""
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MAX_THRESHOLD = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more


def threshold_from_env(environ: Mapping[str, str]) -> int | None:
    """The threshold ``DPLIT_MALLOC_MMAP_THRESHOLD`` asks for (None: leave malloc alone).

    Raises:
        ValueError: the value is neither ``off`` nor a number of bytes in [1, 32 MiB].
    """
    if environ.get("MALLOC_MMAP_THRESHOLD_") is not None:  # the user's glibc setting
        return None
    raw = environ.get(ENV, str(DEFAULT_THRESHOLD)).strip().lower()
    if raw in ("off", "0", "false", "no", "none"):
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
    """Fix glibc's mmap threshold as ``DPLIT_MALLOC_MMAP_THRESHOLD`` says; returns the value set (None: unchanged)."""
    value = threshold_from_env(environ)
    if value is None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return value if libc.mallopt(M_MMAP_THRESHOLD, value) == 1 else None


__all__ = ["DEFAULT_THRESHOLD", "ENV", "threshold_from_env", "tune_malloc"]

"""The `dplit` command's malloc setting (dplit.cli.malloc): parsing, the CLI's error, and its effect on glibc."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dplit.cli import main
from dplit.cli.malloc import ENV, SUGGESTED_THRESHOLD, threshold_from_env

MODULE = Path(__file__).resolve().parents[1] / "dplit" / "cli" / "malloc.py"


def test_threshold_from_env():
    assert threshold_from_env({}) is None  # opt-in
    assert threshold_from_env({ENV: str(SUGGESTED_THRESHOLD)}) == 1 << 20
    assert threshold_from_env({ENV: "65536"}) == 65536
    assert threshold_from_env({ENV: " Off "}) is None and threshold_from_env({ENV: ""}) is None
    assert threshold_from_env({ENV: "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}) is None  # glibc's own wins
    for bad in ("64k", "-1", str(64 << 20)):
        with pytest.raises(ValueError, match=rf"{ENV}='{bad}': expected a number of bytes .* or `off`"):
            threshold_from_env({ENV: bad})


def test_the_command_refuses_a_bad_setting_by_name(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "lots")
    monkeypatch.setattr(sys, "argv", ["dplit", "fit"])
    assert main() == 2
    assert f"{ENV}='lots'" in capsys.readouterr().err


# Free an 8 MiB block (mapped: under glibc's initial 128 KiB threshold), which raises the dynamic threshold to 8 MiB;
# the next 8 MiB block then comes from the heap and, freed, stays resident. A fixed threshold maps and unmaps both.
_PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, sys
    spec = importlib.util.spec_from_file_location("malloc_probe", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(module.tune_malloc({module.ENV: sys.argv[2]}))
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    def rss_kb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
    size, before = 8 << 20, rss_kb()
    for _ in range(2):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(ctypes.c_void_p(p))
    print(rss_kb() - before)
    """
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only (a no-op elsewhere)")
def test_the_fixed_threshold_returns_freed_blocks_to_the_kernel():
    def run(setting: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, str(MODULE), setting], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], int(out[1])

    (set_off, kept_off), (set_on, kept_on) = run("off"), run(str(1 << 20))
    assert (set_off, set_on) == ("None", str(1 << 20))
    assert kept_off > 6 * 1024  # default glibc: the freed 8 MiB stays resident
    assert kept_on < 1024  # fixed threshold: unmapped when freed

"""XLA's CPU buffers on transparent huge pages: the command-line programs restart once with glibc told to
ask for them.

Why: XLA's CPU runtime allocates each execution's temporary buffer anew (2.3 GiB for a DiT-S/2 train step
of 8 x 256 tokens) and frees it at the end. glibc serves an allocation that large with a fresh `mmap` and
returns it with `munmap`, so every step first-touches every page of it again: on a 2-core VM, 580k page
faults and a 0.3 s `munmap` a DiT-S/2 step, 15-18% of the CPU time spent in the kernel zeroing 4 KiB
pages. With `glibc.malloc.hugetlb=1` glibc marks those mappings `MADV_HUGEPAGE`, the kernel backs them
with 2 MiB pages, and the same bytes take 512 times fewer faults. The step computes exactly what it did;
only where its memory comes from changes (benchmarks/README.md has the measurements).

glibc reads its tunables once, when the process starts, so a process cannot change them for itself: the
programs (`python -m soraax.train`, `soraax.sample`, `soraax.eval`, `benchmarks/*.py`) call
`reexec_with_huge_pages()` before anything else and, where it applies, replace themselves with the same
command line under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (same pid, arguments, working directory and
environment otherwise; nothing is printed, so a program's output and one-line errors stay as they were;
`GLIBC_TUNABLES` in the program's environment shows it). It does not apply, and nothing restarts, when
  * `SORAAX_HUGEPAGES=0` is set (the opt-out), or GLIBC_TUNABLES already names `glibc.malloc.hugetlb`;
  * the C library is not glibc 2.35 or newer (the first with the tunable), or this is not Linux;
  * the kernel's transparent huge pages are `never` (nothing to ask for) or unknown;
  * `JAX_PLATFORMS` names platforms without `cpu` (XLA's buffers then live on the accelerator).
Importing soraax, or calling a program's `main()` from Python (as the tests do), never restarts anything.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "SORAAX_HUGEPAGES"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library (musl, macOS's)."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def thp_mode(path: str = _THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode, the bracketed word of e.g. `always [madvise] never`."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_page_env(environ: Mapping[str, str], *, platform: str, glibc: tuple[int, int] | None,
                  thp: str | None) -> dict[str, str] | None:
    """The environment to restart with, or None where restarting would change nothing (module docstring).

    A pure function of its arguments, so each rule is tested without touching the process.
    """
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.partition("=")[0] == TUNABLE for item in tunables.split(":") if item):
        return None
    if not platform.startswith("linux") or glibc is None or glibc < _MIN_GLIBC:
        return None
    if thp not in ("always", "madvise"):
        return None
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and "cpu" not in platforms:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def huge_page_env_here(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """`huge_page_env` for this machine (its platform, glibc and kernel mode) and `environ` (default: this
    process's environment): what a program started with `environ` here would restart with."""
    return huge_page_env(os.environ if environ is None else environ, platform=sys.platform,
                         glibc=glibc_version(), thp=thp_mode())


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command under `huge_page_env`'s environment, where it applies;
    returns (doing nothing) where it does not. Call it first in a program's `__main__` block."""
    env = huge_page_env_here()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not sys.executable or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)

"""soraax/host_memory.py: when a program restarts under glibc's huge-page tunable, that the restart keeps the
command, pid and output, and that it really gets huge pages."""

import os
import subprocess
import sys

import pytest

from soraax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = dict(platform="linux", glibc=(2, 36), thp="madvise")


def _clean(**env):
    """The environment the subprocesses below start with: none of the tunables or the opt-out."""
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    return {**base, "JAX_PLATFORMS": "cpu", **env}


needs_restart = pytest.mark.skipif(host_memory.huge_page_env_here(_clean()) is None,
                                   reason="huge pages do not apply on this machine (not glibc >= 2.35 on Linux, "
                                          "or transparent huge pages never)")


def test_the_tunable_is_added_to_what_is_there_and_the_rest_of_the_environment_is_kept():
    assert host_memory.huge_page_env({"HOME": "/h"}, **LINUX) == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = host_memory.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    for platforms in ("cpu", "tpu,cpu", " cpu "):
        assert host_memory.huge_page_env({"JAX_PLATFORMS": platforms}, **LINUX) is not None
    assert host_memory.huge_page_env({}, platform="linux", glibc=(2, 35), thp="always") is not None


@pytest.mark.parametrize("environ, machine", [
    ({"SORAAX_HUGEPAGES": "0"}, {}),
    ({"SORAAX_HUGEPAGES": "off"}, {}),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),            # the user's own choice wins, 0 included
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"}, {}),
    ({"JAX_PLATFORMS": "tpu"}, {}),                                 # XLA's buffers live on the chip
    ({}, {"platform": "darwin"}),
    ({}, {"glibc": None}),                                          # musl, or another C library
    ({}, {"glibc": (2, 34)}),                                       # before the tunable existed
    ({}, {"thp": "never"}),
    ({}, {"thp": None}),
])
def test_nothing_restarts_where_it_would_change_nothing(environ, machine):
    assert host_memory.huge_page_env(environ, **{**LINUX, **machine}) is None


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(mode)) == "madvise"
    mode.write_text("[never]\n")
    assert host_memory.thp_mode(str(mode)) == "never"
    mode.write_text("garbled\n")
    assert host_memory.thp_mode(str(mode)) is None
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


_PROGRAM = """
import os, sys
print("before", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=False)
from soraax import host_memory
host_memory.reexec_with_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


@needs_restart
def test_a_program_restarts_once_with_its_pid_arguments_and_unflushed_output():
    done = subprocess.run([sys.executable, "-c", _PROGRAM, "a b", "--c"], capture_output=True, text=True,
                          env=_clean(), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    first, second, after = done.stdout.splitlines()
    pid = first.split()[1]
    # The line printed before the restart survives it (stdout is a pipe here, so it was still buffered).
    assert first == f"before {pid} None"
    assert second == f"before {pid} glibc.malloc.hugetlb=1"
    assert after == f"after {pid} glibc.malloc.hugetlb=1 ['a b', '--c']"
    assert done.stderr == ""


@needs_restart
def test_the_opt_out_runs_the_program_once_as_it_is():
    done = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                          env=_clean(SORAAX_HUGEPAGES="0"), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["before", "after"]
    assert "glibc.malloc.hugetlb" not in done.stdout


_BIG_MALLOC = """
import ctypes, re
from soraax import host_memory
host_memory.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20   # far above glibc's mmap threshold: its own mapping, as XLA's temp buffer gets
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)
rollup = open("/proc/self/smaps_rollup").read()
print(int(re.search(r"AnonHugePages:\\s+(\\d+) kB", rollup).group(1)) << 10)
"""


@needs_restart
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_large_allocation_is_backed_by_huge_pages_after_the_restart_and_not_without_it():
    def huge_bytes(**env):
        done = subprocess.run([sys.executable, "-c", _BIG_MALLOC], capture_output=True, text=True,
                              env=_clean(**env), cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())

    assert huge_bytes() >= 128 << 20   # most of the 256 MiB; the kernel may leave the unaligned ends small
    if host_memory.thp_mode() == "madvise":  # under "always" every process gets them, asked or not
        assert huge_bytes(SORAAX_HUGEPAGES="0") < 16 << 20


@needs_restart
@pytest.mark.parametrize("module", ["soraax.train", "soraax.sample", "soraax.eval"])
def test_each_program_restarts_before_jax_is_imported(module):
    # -X importtime lists each process's imports on stderr: the program's first process imports
    # host_memory and restarts; only the restarted one goes on to import JAX. (absl's --help exits 1.)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], capture_output=True,
                          text=True, env=_clean(), cwd=ROOT, timeout=120)
    assert "Traceback" not in done.stderr and "--workdir" in done.stdout + done.stderr, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    marks = [name for name in imported if name in ("soraax.host_memory", "jax")]
    assert marks == ["soraax.host_memory", "soraax.host_memory", "jax"], marks

"""Runs one command as N cooperating JAX processes on this machine, with CPU devices standing in for hosts.

    python launch/local.py --num_processes 2 --devices_per_process 2 -- \\
        python -m soraax.train --config configs/tiny.py --workdir runs/two_hosts

Each child gets SORAAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, SORAAX_NUM_PROCESSES=N, SORAAX_PROCESS_ID=i
(read by soraax.distributed.initialize), JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=D. Output lines are prefixed with "[i] ". SIGINT and
SIGTERM are passed on to every child (a second one kills them); when a child fails, the others are stopped
and this exits with the failed child's code, naming it. The multi-host code paths (jax.distributed,
cross-process collectives over gloo, per-host data shards, Orbax's coordinated saves) run for real; only
the interconnect is loopback.

JAX's distributed runtime takes SIGTERM as a preemption notice and does not exit on it; Ctrl-C (SIGINT)
stops a run at its next step, and a second Ctrl-C or SIGTERM kills every process.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# After one child fails, how long the others get to exit on SIGINT before SIGKILL. They are usually
# blocked in a collective with the failed one (where no Python signal handler runs), so it is short.
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # prctl option (Linux): a signal the kernel sends a child when its parent dies


def free_port() -> int:
    # Bind to port 0 and let the kernel choose; the port is released for process 0's coordinator to take.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], *, process_id: int, num_processes: int, port: int,
              devices_per_process: int) -> dict[str, str]:
    """The environment of child `process_id`: the coordinator, its rank, and D CPU devices."""
    # Any device-count flag already in XLA_FLAGS would fight ours; the other flags are kept.
    xla_flags = [f for f in base.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
    xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    return {**base,
            "SORAAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "SORAAX_NUM_PROCESSES": str(num_processes),
            "SORAAX_PROCESS_ID": str(process_id),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(xla_flags),
            "PYTHONUNBUFFERED": "1"}  # lines arrive as they are printed, not when a buffer fills


def _die_with_parent() -> None:
    # Children run in sessions of their own (below); should this launcher be killed outright, the
    # kernel kills them too instead of leaving N orphans holding the port and the devices.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _forward_lines(process_id: int, stream, lock: threading.Lock) -> None:
    prefix = f"[{process_id}] ".encode()
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            sys.stdout.buffer.flush()
    stream.close()


def _signal_all(children: list[subprocess.Popen], sig: int) -> None:
    for child in children:
        if child.poll() is None:
            try:
                os.killpg(child.pid, sig)  # its process group: Grain workers and the like go too
            except ProcessLookupError:
                pass


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run(command: list[str], *, num_processes: int, devices_per_process: int = 1, port: int = 0) -> int:
    """Starts the N children, waits for them all; returns 0, or the first failure's exit code."""
    port = port or free_port()
    lock = threading.Lock()
    children, readers = [], []
    for i in range(num_processes):
        env = child_env(dict(os.environ), process_id=i, num_processes=num_processes, port=port,
                        devices_per_process=devices_per_process)
        # A session of its own, so that a signal reaches each child once, through us, and the whole
        # process group of a child can be stopped.
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=_die_with_parent)
        children.append(child)
        reader = threading.Thread(target=_forward_lines, args=(i, child.stdout, lock), daemon=True)
        reader.start()
        readers.append(reader)

    received = []

    def forward(sig, _frame):
        # A second Ctrl-C means "now": the children are killed instead of asked.
        received.append(sig)
        _signal_all(children, signal.SIGKILL if len(received) > 1 else sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = None
    try:
        while True:
            codes = [c.poll() for c in children]  # every child polled, each round
            failed = next(((i, code) for i, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None or None not in codes:
                break
            time.sleep(0.1)
        if failed is not None and any(c.poll() is None for c in children):
            print(f"launch: process {failed[0]} {_describe_exit(failed[1])}; stopping the others",
                  file=sys.stderr, flush=True)
            _signal_all(children, signal.SIGINT)
            deadline = time.monotonic() + STOP_GRACE_S
            while any(c.poll() is None for c in children) and time.monotonic() < deadline:
                time.sleep(0.1)
            _signal_all(children, signal.SIGKILL)
        for child in children:
            child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for reader in readers:
        reader.join(timeout=5)
    if failed is None:
        return 0
    index, code = failed
    print(f"launch: process {index} of {num_processes} {_describe_exit(code)}", file=sys.stderr, flush=True)
    return code if code > 0 else 128 - code


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python launch/local.py --num_processes N [--devices_per_process D] "
                         "[--port P] -- COMMAND ...   (the '--' before the command is required)")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, required=True, help="processes to start (N >= 1)")
    parser.add_argument("--devices_per_process", type=int, default=1, help="CPU devices each process sees")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after '--'")
    if args.num_processes < 1:
        parser.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    return args, command


def main(argv: list[str]) -> int:
    args, command = parse_args(argv)
    return run(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
               port=args.port)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

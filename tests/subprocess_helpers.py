"""Run Python in fresh interpreters from a test: for settings that must precede a framework's start-up
(JAX's host device count, TensorFlow's logical devices) and for multi-process jobs (torch.distributed)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time


def run_python(argv_per_process, *, env=None, timeout=300):
    """Start one ``python ARGS...`` per entry of ``argv_per_process`` at once; fail unless all exit 0.

    Each entry is the argument list after the interpreter (``["-c", code]`` or ``[script, arg, ...]``).
    Returns the processes' outputs (stdout and stderr together), in order. As soon as one process fails, or
    at the time-out, the others are killed (a rank waiting on a dead peer would otherwise hang), and the
    assertion shows every process's output.
    """
    logs = [tempfile.TemporaryFile(mode="w+") for _ in argv_per_process]
    procs = [
        subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        for argv, log in zip(argv_per_process, logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [proc.returncode for proc in procs]
    assert codes == [0] * len(procs), "\n".join(
        f"--- process {i} exited {code}{' (killed)' if code and code < 0 else ''}:\n{out}"
        for i, (code, out) in enumerate(zip(codes, outputs))
    )
    return outputs

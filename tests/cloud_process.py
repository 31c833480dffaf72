"""`moetandem cloud` in a subprocess, for the tests that need a real process (to kill, freeze or signal it): one
place for the command line and for reading the machine-readable line it prints once it listens."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any


def start_cloud(ckpt: Path, token_file: Path, *extra: str, stderr: Any = subprocess.DEVNULL
                ) -> tuple[subprocess.Popen, dict]:
    """Start `moetandem cloud --model ckpt` on a free port; returns (process, its listening line: {"listening":
    port, ...}). stderr: subprocess.PIPE to read its log (e.g. wait for "draining")."""
    proc = subprocess.Popen([sys.executable, "-m", "moetandem", "cloud", "--model", str(ckpt), "--listen",
                             "127.0.0.1:0", "--token-file", str(token_file), "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise AssertionError(f"moetandem cloud {' '.join(extra)} exited with {proc.wait()} before listening")
    return proc, json.loads(line)


def kill_cloud(proc: subprocess.Popen) -> None:
    """Kill it (resuming it first, in case a test froze it) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()


def stop_cloud(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """SIGTERM (a drain), then its exit status; killed if it does not exit within timeout_s."""
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            kill_cloud(proc)

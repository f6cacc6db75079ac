"""SDK background threads never take the process's termination signals.

Linux hands a process-directed signal to any thread that does not block it.  Taken by an SDK thread, SIGTERM would
only be flagged for the main thread, and a main thread asleep (``time.sleep``, a queue wait) would not run the
flush-on-SIGTERM handler until it woke up: the runner's cancel would wait for the kill after its grace period.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path


SCRIPT = textwrap.dedent("""
    import json, threading, time, kiln_sdk
    run = kiln_sdk.init()
    run.log_metrics(1, {"loss": 1.0})
    run.artifact(__import__("sys").argv[1])
    time.sleep(0.5)
    masks = {}
    for t in threading.enumerate():
        if t.name.startswith("kiln-sdk-"):
            for line in open(f"/proc/self/task/{t.native_id}/status"):
                if line.startswith("SigBlk:"):
                    masks[t.name] = int(line.split()[1], 16)
    main = threading.main_thread().native_id
    for line in open(f"/proc/self/task/{main}/status"):
        if line.startswith("SigBlk:"):
            masks["main"] = int(line.split()[1], 16)
    print(json.dumps(masks), flush=True)
    run.finish(timeout=1)
""")


def _blocked(mask: int, sig: int) -> bool:
    return bool(mask >> (sig - 1) & 1)


def test_sdk_threads_block_sigterm_sigint_sighup_and_the_main_thread_does_not(tmp_path: Path) -> None:
    weights = tmp_path / "last.pt"
    weights.write_bytes(b"w" * 1000)
    env = {"KILN_JOB_ID": "sig-1", "KILN_PROJECT": "p", "KILN_ATTEMPT": "1", "KILN_JOB_DIR": str(tmp_path),
           "KILN_NATS_URL": "nats://127.0.0.1:9", "KILN_SYSTEM_METRICS_S": "0.1",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(weights)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    masks = json.loads(out.stdout.splitlines()[0])
    assert {"kiln-sdk-publisher", "kiln-sdk-system", "kiln-sdk-artifacts"} <= set(masks), masks
    for name, mask in masks.items():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            assert _blocked(mask, sig) == (name != "main"), (name, sig, hex(mask))

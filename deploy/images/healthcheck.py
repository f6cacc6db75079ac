"""HEALTHCHECK of the Kiln images: ``GET /readyz`` of the Kiln service running in this container.

The image runs one service, chosen by its command; this finds which one from the container's processes (PID 1, or
a child of an init such as ``--init``'s) and asks that service's own port:

    api                  KILN_API_HOST / KILN_API_PORT (8000)
    notifier             KILN_NOTIFIER_HOST / KILN_NOTIFIER_PORT (8001)
    metrics-writer       KILN_WRITER_METRICS_HOST / KILN_WRITER_METRICS_PORT
    clearml-forwarder    KILN_CLEARML_METRICS_HOST / KILN_CLEARML_METRICS_PORT
    runner               KILN_RUNNER_METRICS_HOST / KILN_RUNNER_METRICS_PORT

Exit 0 when it answers 200, 1 otherwise. A container running something else (the migrations, the provisioning
step, a shell) or a worker without a metrics port is reported healthy: there is nothing to ask. Kubernetes ignores
HEALTHCHECK and uses the probes of deploy/k8s instead. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# module -> (console script, env prefix of its host and port settings, default port or None: no server by default)
SERVICES: dict[str, tuple[str, str, int | None]] = {
    "kiln_api": ("kiln-api", "KILN_API_", 8000),
    "kiln_notifier": ("kiln-notifier", "KILN_NOTIFIER_", 8001),
    "kiln_metrics_writer": ("kiln-metrics-writer", "KILN_WRITER_METRICS_", None),
    "kiln_clearml_forwarder": ("kiln-clearml-forwarder", "KILN_CLEARML_METRICS_", None),
    "kiln_runner": ("kiln-runner", "KILN_RUNNER_METRICS_", None),
}


def service_of(argv: list[str]) -> str | None:
    """The Kiln service a command line runs (``python -m kiln_api`` or the ``kiln-api`` script), else None.

    >>> service_of(["/opt/kiln/bin/python3", "/opt/kiln/bin/kiln-notifier"])
    'kiln_notifier'
    >>> service_of(["python", "-m", "kiln_runner"]), service_of(["python", "-m", "kiln_store", "upgrade"])
    ('kiln_runner', None)
    """
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in SERVICES:
            return argv[i + 1]
        for module, (script, _, _) in SERVICES.items():
            if os.path.basename(arg) == script:
                return module
    return None


def running_service(proc: Path = Path("/proc")) -> str | None:
    """The first Kiln service among this container's processes, lowest pid first."""
    pids = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit()) if proc.is_dir() else []
    for pid in pids:
        try:
            argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found = service_of([a.decode(errors="replace") for a in argv if a])
        if found:
            return found
    return None


def url_of(module: str, env: dict[str, str]) -> str | None:
    """Where ``module`` answers /readyz under ``env``; None when it runs no HTTP server.

    >>> url_of("kiln_api", {"KILN_API_HOST": "0.0.0.0"})
    'http://127.0.0.1:8000/readyz'
    >>> url_of("kiln_metrics_writer", {}), url_of("kiln_runner", {"KILN_RUNNER_METRICS_PORT": "9100"})
    (None, 'http://127.0.0.1:9100/readyz')
    """
    _, prefix, default = SERVICES[module]
    port = env.get(prefix + "PORT") or (str(default) if default else None)
    if not port or port == "0":
        return None
    host = env.get(prefix + "HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/readyz"


def main() -> int:
    module = sys.argv[1] if len(sys.argv) > 1 else running_service()
    if module is None:
        print("no Kiln service runs here: nothing to check")
        return 0
    url = url_of(module, dict(os.environ))
    if url is None:
        print(f"{module} runs no metrics/health server (its METRICS_PORT is unset): nothing to check")
        return 0
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 - a loopback URL built above
            print(f"{module}: {resp.status} {resp.read(512).decode(errors='replace')}")
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"{module}: {exc.code} {exc.read(512).decode(errors='replace')}")
    except OSError as exc:
        print(f"{module}: {url} unreachable: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

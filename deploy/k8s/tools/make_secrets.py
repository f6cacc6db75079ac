"""Make the files of Kiln's Kubernetes Secrets (and the NATS trust ConfigMap) from a trust chain and key pair.

Run on an operator's machine with Kiln's packages installed (the repository's .venv), never in the cluster:

    .venv/bin/python deploy/k8s/tools/make_secrets.py --dir ~/kiln-secrets --pools default [--nats-ca ca.crt]
    sh ~/kiln-secrets/apply.sh            # kubectl create ... | kubectl apply -f -, one Secret at a time

``--dir`` is kept (offline, backed up): ``trust/`` is the NATS trust chain of
``kiln_contracts.natsauth.trust.setup_trust`` (made once, then loaded: a new pool gets its creds, a role whose
rights changed gets new ones) and ``tickets/`` the WebSocket ticket key pair (made once). ``k8s/<name>/<key>`` are
the files of each object, written again at every run; ``apply.sh`` creates or updates them. The operator's own keys
(``trust/keys/operator.nk``, ``system.nk``, ``services.nk``, ``operator-signing.nk``) never leave ``--dir``.

What the manifests of deploy/k8s reference and this makes (tests/unit/test_deploy_k8s.py checks both lists agree):

    Secret kiln-nats-<role>/nats.creds     one per identity: provisioner, api, notifier, metrics-writer,
                                           clearml-forwarder, runner-<pool> for each pool
    Secret kiln-nats-trainer-key/trainer.nk  the trainer scoped signing key (runners mint per-attempt creds)
    Secret kiln-nats-account/account       public key of the KILN account (runners; KEDA's scaler)
    Secret kiln-ticket-signing/private.pem the API's Ed25519 ticket key; kiln-ticket-verify/public.pem the notifier's
    Secret kiln-nats-ca/ca.crt, bundle.crt with --nats-ca: the NATS CA, and public CAs + it (SSL_CERT_FILE)
    ConfigMap kiln-nats-trust/trust.conf   operator mode of the NATS Helm release (deploy/k8s/nats/values.yaml)

Not made here (given by the operator): kiln-database (url), kiln-bootstrap-key (key, optional), kiln-tls (the
Ingress certificate), kiln-nats-tls (the NATS servers' certificate), kiln-clearml (clearml.conf).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln_contracts.natsauth.trust import TrustChain

SECRET_MODE = 0o600
# made by the operator, referenced by the manifests
GIVEN_SECRETS = ("kiln-database", "kiln-bootstrap-key", "kiln-tls", "kiln-nats-tls", "kiln-clearml")


def secret_name(role: str) -> str:
    """The Secret holding one NATS identity's creds (``nats.creds``)."""
    return f"kiln-nats-{role}"


def trust_conf(chain: TrustChain) -> str:
    """The operator-mode part of the NATS server config: the chart's nats.conf includes it (values.yaml)."""
    operator = chain.operator_jwt_path.read_text().strip()
    return "\n".join([
        "# Kiln's NATS trust (operator mode), made by deploy/k8s/tools/make_secrets.py from its trust chain.",
        f'operator: "{operator}"',
        f"system_account: {chain.system_account}",
        "resolver_preload: {",
        f'  {chain.system_account}: "{chain.system_account_jwt()}"',
        f'  {chain.account}: "{chain.account_jwt()}"',
        "}",
        "",
    ])


def _write(path: Path, data: bytes | str, mode: int = SECRET_MODE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)


def _ticket_keys(folder: Path) -> tuple[bytes, bytes]:
    private, public = folder / "private.pem", folder / "public.pem"
    if not private.exists():
        from kiln_contracts.tickets import generate_keypair

        pem, pub = generate_keypair()
        _write(private, pem)
        _write(public, pub, 0o644)
    return private.read_bytes(), public.read_bytes()


def _ca_bundle(ca: bytes) -> bytes:
    """Public CAs (certifi's bundle, else the system's) followed by the NATS CA."""
    try:
        import certifi

        public = Path(certifi.where()).read_bytes()
    except ImportError:
        public = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    return public.rstrip(b"\n") + b"\n" + ca


def make(root: Path, pools: tuple[str, ...], nats_ca: Path | None = None,
         namespace: str = "kiln") -> dict[tuple[str, str], dict[str, Path]]:
    """Write every object's files under ``root/k8s`` and ``root/apply.sh``; returns {(kind, name): {key: file}}."""
    from kiln_contracts.natsauth import permissions
    from kiln_contracts.natsauth.trust import setup_trust

    chain = setup_trust(root / "trust", pools)
    out = root / "k8s"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, mode=0o700)
    objects: dict[tuple[str, str], dict[str, Path]] = {}

    def put(kind: str, name: str, key: str, data: bytes | str, mode: int = SECRET_MODE) -> None:
        path = out / name / key
        _write(path, data, mode)
        objects.setdefault((kind, name), {})[key] = path

    for role in permissions.service_roles(pools):
        put("Secret", secret_name(role.name), "nats.creds", chain.creds_path(role.name).read_bytes())
    put("Secret", "kiln-nats-trainer-key", "trainer.nk", chain.seed_path(permissions.TRAINER.role).read_bytes())
    put("Secret", "kiln-nats-account", "account", chain.account)
    private, public = _ticket_keys(root / "tickets")
    put("Secret", "kiln-ticket-signing", "private.pem", private)
    put("Secret", "kiln-ticket-verify", "public.pem", public, 0o644)
    if nats_ca is not None:
        ca = nats_ca.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in ca:
            raise SystemExit(f"--nats-ca {nats_ca}: not a PEM certificate")
        put("Secret", "kiln-nats-ca", "ca.crt", ca, 0o644)
        put("Secret", "kiln-nats-ca", "bundle.crt", _ca_bundle(ca), 0o644)
    put("ConfigMap", "kiln-nats-trust", "trust.conf", trust_conf(chain), 0o644)

    ns = shlex.quote(namespace)
    lines = ["#!/bin/sh", "# Made by deploy/k8s/tools/make_secrets.py: create or update Kiln's Secrets and the NATS",
             "# trust ConfigMap (the files beside this script). Needs kubectl with access to the namespace.",
             "set -eu", 'cd "$(dirname "$0")/k8s"',
             f"kubectl get namespace {ns} >/dev/null 2>&1 || kubectl create namespace {ns}"]
    for (kind, name), files in sorted(objects.items()):
        sources = " ".join(f"--from-file={shlex.quote(f'{key}={name}/{key}')}" for key in sorted(files))
        verb = "secret generic" if kind == "Secret" else "configmap"
        lines.append(f"kubectl -n {ns} create {verb} {name} {sources} --dry-run=client -o yaml | kubectl apply -f -")
    _write(root / "apply.sh", "\n".join(lines) + "\n", 0o700)
    return objects


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="kept folder: trust chain, ticket keys, output")
    parser.add_argument("--pools", default="default", help="runner pools, comma-separated (default: default)")
    parser.add_argument("--nats-ca", type=Path, help="CA certificate (PEM) of the NATS servers, when they use TLS")
    parser.add_argument("--namespace", default="kiln")
    args = parser.parse_args(argv)
    pools = tuple(dict.fromkeys(p.strip() for p in args.pools.split(",") if p.strip()))
    if not pools:
        parser.error("--pools names no pool")
    args.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    objects = make(args.dir, pools, args.nats_ca, args.namespace)
    for kind, name in sorted(objects):
        print(f"{kind:9} {name}: {', '.join(sorted(objects[kind, name]))}")
    print(f"apply with: sh {args.dir / 'apply.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

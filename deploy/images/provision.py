"""The NATS provisioning step of a deployment: every stream, KV bucket and service durable, made with the
provisioner identity (``kiln_contracts.natsauth.provision.provision``, docs/nats-auth.md).

Run once per deploy and again after an upgrade that changes the contracts (the Kubernetes Job ``kiln-provision``
runs ``python /opt/kiln-tools/provision.py`` in the services image). Settings, all from the environment:

    KILN_PROVISION_NATS_URL          NATS URL(s), comma-separated (default nats://127.0.0.1:4222)
    KILN_PROVISION_NATS_CREDS_FILE   the provisioner's creds (<trust>/creds/provisioner.creds); required
    KILN_PROVISION_POOLS             runner pools whose durables to create, comma-separated (default: default)
    KILN_PROVISION_REPLICAS          copies of each stream and bucket (3 on a 3-node cluster); unset: keep existing
    KILN_PROVISION_WAIT_S            how long to keep trying to reach NATS (default 120)

A TLS server's CA comes from SSL_CERT_FILE (the default SSL context of nats-py), as for the services.
Exit 0 once everything exists with the contracts' configuration; non-zero with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def _pools(text: str) -> tuple[str, ...]:
    pools = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not pools:
        raise SystemExit("KILN_PROVISION_POOLS names no pool")
    return pools


async def run() -> None:
    import nats

    from kiln_contracts.natsauth import permissions
    from kiln_contracts.natsauth.provision import provision

    servers = [u.strip() for u in os.environ.get("KILN_PROVISION_NATS_URL", "nats://127.0.0.1:4222").split(",")
               if u.strip()]
    creds = os.environ.get("KILN_PROVISION_NATS_CREDS_FILE")
    if not creds:
        raise SystemExit("KILN_PROVISION_NATS_CREDS_FILE is required: the provisioner's creds file")
    pools = _pools(os.environ.get("KILN_PROVISION_POOLS", "default"))
    replicas = int(os.environ["KILN_PROVISION_REPLICAS"]) if os.environ.get("KILN_PROVISION_REPLICAS") else None
    deadline = time.monotonic() + float(os.environ.get("KILN_PROVISION_WAIT_S", "120"))
    while True:
        try:
            nc = await nats.connect(servers, user_credentials=creds, inbox_prefix=permissions.provisioner().inbox,
                                    name="kiln-provision", connect_timeout=5, allow_reconnect=False)
            break
        except Exception as exc:  # noqa: BLE001 - NATS may still be starting: retry until the deadline
            if time.monotonic() >= deadline:
                raise SystemExit(f"cannot reach NATS at {', '.join(servers)}: {exc!r}") from None
            print(f"NATS not reachable yet ({exc!r}); retrying in 3 s", flush=True)
            await asyncio.sleep(3)
    try:
        await provision(nc.jetstream(timeout=10), pools, replicas=replicas)
    finally:
        await nc.close()
    print(f"provisioned streams, buckets and durables for pools {', '.join(pools)} "
          f"({'replicas kept' if replicas is None else f'{replicas} replicas'})", flush=True)


if __name__ == "__main__":
    asyncio.run(run())
    sys.exit(0)

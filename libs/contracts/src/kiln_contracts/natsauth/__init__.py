"""Least-privilege NATS identities for Kiln: decentralized JWT auth with scoped signing keys.

- :mod:`.jwt`: mint and check operator, account and user JWTs and ``.creds`` files (on ``nkeys``).
- :mod:`.jsapi`: the NATS-side subjects a JetStream client needs, per kind of use.
- :mod:`.permissions`: each Kiln identity's rights, generated from the contracts; the two scope templates.
- :mod:`.trust`: the trust chain on disk (keys, JWTs, service creds).
- :mod:`.mint`: trainer and third-party users from a scoped key alone.
- :mod:`.server`: the nats-server configuration; revocation pushes.
- :mod:`.provision`: what the provisioner creates (streams, buckets, durables) and what services check.

See docs/nats-auth.md.
"""

"""The pure parts of kiln_contracts.natsauth: JWTs and creds, the trust chain's files, generated permissions."""

from __future__ import annotations

import doctest
import re
import stat
import time
from pathlib import Path

import pytest

from kiln_contracts import streams, subjects
from kiln_contracts.natsauth import client, jsapi, mint, permissions, provision, server, trust
from kiln_contracts.natsauth import jwt as nj
from kiln_contracts.natsauth.mint import mint_third_party, mint_trainer
from kiln_contracts.natsauth.permissions import SCOPES, THIRD_PARTY, TRAINER, service_roles
from kiln_contracts.natsauth.trust import load_trust, setup_trust

ROOT = Path(__file__).resolve().parents[2]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def allowed(role: permissions.Role, subject: str) -> bool:
    return any(matches(p, subject) for p in role.pub_allow) and not any(matches(p, subject) for p in role.pub_deny)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> trust.TrustChain:
    return setup_trust(tmp_path_factory.mktemp("trust") / "nats", ("gpu",))


@pytest.mark.parametrize("module", [nj, jsapi, permissions, mint, server, client])
def test_doctests(module: object) -> None:
    assert doctest.testmod(module).failed == 0  # type: ignore[arg-type]


def test_keys_have_their_nkey_prefixes() -> None:
    for kind, letter in (("operator", "O"), ("account", "A"), ("user", "U")):
        key = nj.Key.new(kind)
        assert key.seed.startswith("S" + letter) and key.public_key.startswith(letter)


def test_a_jwt_round_trips_through_nkeys_verification_and_tampering_is_caught() -> None:
    op = nj.Key.new("operator")
    token = nj.encode(nj.operator_claims(op, "kiln", system_account="ASYS", signing_keys=[]), op, iat=123)
    claims = nj.verify(token)
    assert (claims["iss"], claims["sub"], claims["iat"], claims["nats"]["type"]) == (op.public_key, op.public_key,
                                                                                      123, "operator")
    head, body, sig = token.split(".")
    forged = nj.encode({**claims, "name": "evil"}, op).split(".")[1]
    with pytest.raises(nj.InvalidJWT):
        nj.verify(f"{head}.{forged}.{sig}")
    other = nj.encode(claims, nj.Key.new("operator"))  # re-signed by someone else, iss rewritten
    assert nj.verify(other)["iss"] != op.public_key
    with pytest.raises(nj.InvalidJWT):
        nj.verify("not.a.jwt")


def test_creds_text_round_trips() -> None:
    user = nj.Key.new("user")
    token = nj.encode(nj.user_claims(user.public_key, "u"), nj.Key.new("account"))
    assert nj.parse_creds(nj.creds_text(token, user)) == (token, user)


def test_the_account_jwt_carries_jetstream_signing_keys_and_scopes(chain: trust.TrustChain) -> None:
    claims = nj.verify(chain.account_jwt())
    assert claims["iss"] == chain.state["operator_signing_key"] and claims["sub"] == chain.account
    nats = claims["nats"]
    assert nats["limits"]["disk_storage"] != 0
    plain = [k for k in nats["signing_keys"] if isinstance(k, str)]
    scoped = {k["role"]: k for k in nats["signing_keys"] if isinstance(k, dict)}
    assert plain == [chain.state["signing_keys"]["services"]]
    assert scoped["trainer"]["kind"] == "user_scope"
    assert scoped["trainer"]["template"]["pub"]["allow"] == TRAINER.pub_allow
    assert scoped["third-party"]["template"]["sub"]["allow"] == ["_INBOX.{{subject()}}.>"]


def test_reissuing_the_account_jwt_always_moves_iat_forward(chain: trust.TrustChain) -> None:
    iats = [nj.decode(chain.account_jwt(reissue=True))["iat"] for _ in range(3)]
    assert iats[0] < iats[1] < iats[2]


def test_revocations_and_their_pruning(chain: trust.TrustChain) -> None:
    user = nj.Key.new("user").public_key
    with chain.transaction() as state:
        state["revocations"][user] = {"at": int(time.time()), "until": int(time.time()) - 1}
    assert user in nj.decode(chain.account_jwt(reissue=True))["nats"]["revocations"]
    assert server.prune_revocations(chain) == [user]
    assert "revocations" not in nj.decode(chain.account_jwt())["nats"]


def test_two_processes_changing_the_chain_lose_nothing(chain: trust.TrustChain) -> None:
    """The API revokes while ``kiln up`` (another process, its own copy of the state) re-mints a role: both stay."""
    other = load_trust(chain.root)  # loaded before the revocation, as a second process would be
    user = nj.Key.new("user").public_key
    with chain.transaction() as state:
        state["revocations"][user] = {"at": int(time.time()), "until": None}
    other.service_creds(permissions.notifier())  # saves the roles from a stale copy: must keep the revocation
    fresh = load_trust(chain.root)
    assert user in fresh.state["revocations"]
    assert fresh.state["roles"]["notifier"]["user"] != chain.state["roles"]["notifier"]["user"]
    assert user in nj.decode(other.account_jwt(reissue=True))["nats"]["revocations"]


def test_secrets_are_mode_0600_and_setup_is_repeatable(chain: trust.TrustChain) -> None:
    files = [*(chain.root / "keys").iterdir(), *(chain.root / "creds").iterdir()]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    state = (chain.root / "trust.json").read_text()
    assert not [f for f in (chain.root / "keys").iterdir() if f.read_text().strip() in state]  # no seed in it
    again = setup_trust(chain.root, ("gpu", "cpu"))
    assert again.account == chain.account and again.creds_path("runner-cpu").exists()
    assert load_trust(chain.root).state["operator"] == chain.state["operator"]


def test_setup_remints_creds_whose_rights_changed_and_reissues_a_changed_account(chain: trust.TrustChain) -> None:
    before = dict(chain.state["roles"]["notifier"])
    chain.state["roles"]["notifier"]["rights"] = "older"  # as if the code gave the role other rights since
    chain.state["account_digest"] = "older"
    iat = chain.state["account_iat"]
    chain.save()
    again = setup_trust(chain.root, ("gpu",))
    assert again.state["roles"]["notifier"]["user"] != before["user"]
    assert again.state["roles"]["api"] == chain.state["roles"]["api"]
    assert nj.decode(again.account_jwt())["iat"] > iat


def test_service_creds_carry_the_role_permissions(chain: trust.TrustChain) -> None:
    token, _ = nj.parse_creds(chain.creds_path("metrics-writer").read_text())
    claims = nj.verify(token)
    role = permissions.metrics_writer()
    assert claims["iss"] == chain.state["signing_keys"]["services"]
    assert claims["nats"]["issuer_account"] == chain.account
    assert claims["nats"]["pub"]["allow"] == role.pub_allow and claims["nats"]["sub"]["allow"] == role.sub_allow


def test_a_trainer_user_carries_tags_and_expiry_and_no_permissions(chain: trust.TrustChain) -> None:
    key = chain.key("trainer")
    m = mint_trainer(key.seed, chain.account, "vision", "j-1", int(time.time()) + 60, attempt=2)
    claims = nj.verify(nj.parse_creds(m.creds)[0])
    assert claims["iss"] == key.public_key and claims["sub"] == m.public_key
    assert claims["nats"] == {"type": "user", "version": 2, "issuer_account": chain.account,
                              "tags": ["project:vision", "job:j-1"]}
    assert claims["exp"] == m.expires_at and claims["name"] == "trainer/vision/j-1/2"
    assert m.inbox_prefix == f"_INBOX.{m.public_key}"
    with pytest.raises(ValueError):
        mint_trainer(key.seed, chain.account, "vision", "j.1", int(time.time()) + 60)
    with pytest.raises(ValueError):
        mint_trainer(key.seed, chain.account, "vision", "j1", int(time.time()) - 1)


def test_third_party_consumer_names_cannot_collide() -> None:
    key = nj.Key.new("account")
    assert mint_third_party(key.seed, key.public_key, "a-b", "c").name == "third-party/a-b/c"
    with pytest.raises(ValueError):
        mint_third_party(key.seed, key.public_key, "a", "b-c")  # tp-a-b-c would be project a-b's durable
    events, logs = provision.third_party_consumers("p1", "acme")
    assert (events.config.durable_name, events.config.filter_subject) == ("tp-p1-acme", "kiln.evt.p1.>")
    assert (logs.stream, logs.config.filter_subject) == ("KILN_LOGS", "kiln.log.p1.*")


def test_the_trainer_template_is_its_own_job_only() -> None:
    assert TRAINER.pub_allow == ["kiln.evt.{{tag(project)}}.{{tag(job)}}.>", "kiln.log.{{tag(project)}}.{{tag(job)}}"]
    assert TRAINER.sub_allow == ["_INBOX.{{subject()}}.>"]
    filled = [p.replace("{{tag(project)}}", "p1").replace("{{tag(job)}}", "j1") for p in TRAINER.pub_allow]
    assert any(matches(p, subjects.event("p1", "j1", "metrics")) for p in filled)
    assert not any(matches(p, s) for p in filled for s in (subjects.event("p1", "j2", "metrics"),
                                                         subjects.log("p2", "j1"), subjects.start("gpu")))


def test_the_third_party_template_reads_and_never_creates() -> None:
    assert not [p for p in THIRD_PARTY.pub_allow if "CREATE" in p or "DELETE" in p or p.startswith("kiln.")]
    assert "$JS.API.CONSUMER.MSG.NEXT.KILN_EVENTS.tp-{{tag(project)}}-{{tag(consumer)}}" in THIRD_PARTY.pub_allow


def test_no_service_holds_a_wildcard_it_should_not() -> None:
    roles = {r.name: r for r in service_roles(("gpu",))}
    inboxes = [r.inbox for r in roles.values()]
    assert len(set(inboxes)) == len(inboxes)
    for r in roles.values():
        assert r.sub_allow[-1] == f"{r.inbox}.>" and "_INBOX.>" not in r.sub_allow and ">" not in r.pub_allow
        if r.name != "provisioner":
            assert not [p for p in r.pub_allow if re.search(r"STREAM\.(CREATE|UPDATE|DELETE|PURGE)|\$JS\.API\.>", p)]


EXPECT = [  # (role, subject, allowed)
    ("api", subjects.start("gpu"), True),
    ("api", subjects.cancel("j1"), True),
    ("api", subjects.event("p1", "j1", "status"), True),
    ("api", subjects.audit("p1", "job_started"), True),
    ("api", jsapi.kv_keys(streams.CLAIMS_BUCKET, "j1.cancel"), True),
    ("api", jsapi.kv_keys(streams.CLAIMS_BUCKET, "j1.1"), False),
    ("api", subjects.log("p1", "j1"), False),
    ("api", "$JS.API.CONSUMER.CREATE.KILN_EVENTS.tp-p1-acme.kiln.evt.p1.>", True),
    ("api", "$JS.API.CONSUMER.DELETE.KILN_EVENTS.metrics-writer-events", False),
    ("runner-gpu", "$JS.API.CONSUMER.CREATE.KILN_JOBS.runner-gpu.kiln.cmd.start.gpu", True),
    ("runner-gpu", "$JS.API.CONSUMER.CREATE.KILN_JOBS.runner-gpu.kiln.cmd.start.>", False),
    ("runner-gpu", "$JS.API.CONSUMER.MSG.NEXT.KILN_JOBS.runner-cpu", False),
    ("runner-gpu", subjects.start("cpu"), True),  # the reaper re-queues any pool's lost attempts
    ("runner-gpu", subjects.log("p1", "j1"), True),
    ("runner-gpu", subjects.dlq("runner-gpu"), True),
    ("runner-gpu", subjects.dlq("metrics-writer-events"), False),
    ("runner-gpu", subjects.audit("p1", "x"), False),
    ("metrics-writer", "$JS.API.CONSUMER.MSG.NEXT.KILN_LOGS.metrics-writer-logs", True),
    ("metrics-writer", "$JS.ACK.KILN_EVENTS.metrics-writer-events.1.2.3.4.5", True),
    ("metrics-writer", subjects.dlq("metrics-writer-events"), True),
    ("metrics-writer", subjects.event("p1", "j1", "status"), False),
    ("metrics-writer", "$JS.API.STREAM.DELETE.KILN_EVENTS", False),
    ("clearml-forwarder", "$KV.kiln_clearml_tasks.j1", True),
    ("clearml-forwarder", "$KV.kiln_claims.j1", False),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_EVENTS", False),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_EVENTS.notifier-ab12.kiln.evt.p1.j1.>", True),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_LOGS.notifier-ab12.kiln.log.p1.j1", True),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_EVENTS.metrics-writer-events.kiln.evt.>", False),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_JOBS.x.kiln.cmd.start.>", False),
    ("notifier", "$JS.API.CONSUMER.DELETE.KILN_EVENTS.abcdef12", True),
    ("notifier", "$JS.API.CONSUMER.DELETE.KILN_EVENTS.metrics-writer-events", False),
    ("notifier", "$JS.API.CONSUMER.CREATE.KILN_EVENTS.x.kiln.evt.>", True),
    ("notifier", subjects.event("p1", "j1", "status"), False),
]


@pytest.mark.parametrize(("role", "subject", "expected"), EXPECT, ids=[f"{r} {s}" for r, s, _ in EXPECT])
def test_generated_permissions(role: str, subject: str, expected: bool) -> None:
    roles = {r.name: r for r in service_roles(("gpu", "cpu"))}
    assert allowed(roles[role], subject) is expected


def test_the_server_config_trusts_the_chain(chain: trust.TrustChain, tmp_path: Path) -> None:
    conf = server.server_config(chain, port=4333, store_dir=tmp_path / "js")
    assert "resolver: { type: full" in conf and f"operator: \"{chain.operator_jwt_path}\"" in conf
    preloaded = dict(re.findall(r"^\s+(A[A-Z0-9]{55}): \"([^\"]+)\"$", conf, re.M))
    assert set(preloaded) == {chain.account, chain.system_account}
    assert all(nj.verify(token)["sub"] == account for account, token in preloaded.items())
    assert "tls {" not in conf


def test_the_doc_table_is_the_generated_one() -> None:
    doc = (ROOT / "docs" / "nats-auth.md").read_text()
    table = doc.split("<!-- permissions:begin -->\n", 1)[1].split("<!-- permissions:end -->", 1)[0]
    assert table == permissions.markdown_table(), "run: python -m kiln_contracts.natsauth.permissions"


def test_every_scope_is_in_the_account() -> None:
    assert {s.role for s in SCOPES} <= set(trust._SEEDS)


def test_nats_tls_builds_a_verifying_client_context(tmp_path: Path) -> None:
    from kiln_testing.natsauth import make_ca

    ca = make_ca(tmp_path / "ca")
    tls = client.NatsTls(ca.root / "ca.pem", ca.root / "client.pem", ca.root / "client-key.pem")
    ctx = tls.context()
    assert ctx is not None and ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname
    assert client.NatsTls.from_env(tls.env()) == tls
    assert client.connect_options(None, None, tls)["tls"] is not None and client.connect_options(None, None) == {}
    with pytest.raises(ValueError, match="needs its key"):
        client.NatsTls(ca.root / "ca.pem", ca.root / "client.pem")
    with pytest.raises(ValueError, match="no NATS server"):
        client.servers(" , ")

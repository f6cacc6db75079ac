"""Per-attempt trainer credentials, minted at spawn with the trainer scoped signing key (docs/nats-auth.md).

The user JWT carries the job's project and id as tags and no rights of its own: the server gives it the key's
template, i.e. publish ``kiln.evt.<project>.<job>.>`` and ``kiln.log.<project>.<job>``, receive under its own
inbox prefix, nothing else.  It expires with the attempt's timeout plus a grace for the trainer's last flush.  The
file lies in the attempt's job folder with mode 0600 from its first byte; the trainer gets its path and the inbox
prefix in its environment (never argv, never a log), and the runner deletes it once the trainer is gone.  What the
trainer could not publish (its spool) the runner replays with its own identity.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kiln_contracts import StartJob
from kiln_contracts.natsauth.mint import mint_trainer
from kiln_contracts.natsauth.trust import write_secret

from ..settings import Settings

log = logging.getLogger("kiln.runner")
CREDS_FILE = "nats.creds"
CREDS_ENV, INBOX_ENV = "KILN_NATS_CREDS", "KILN_NATS_INBOX_PREFIX"


@dataclass(frozen=True)
class Issued:
    """One attempt's credentials on disk; ``public_key`` identifies the user (revocation), it is not secret."""

    path: Path
    inbox_prefix: str
    public_key: str
    expires_at: int

    def env(self) -> dict[str, str]:
        return {CREDS_ENV: str(self.path), INBOX_ENV: self.inbox_prefix}

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class TrainerCreds:
    """Mints trainer users with the trainer scoped key's seed and the account's public key (nothing else)."""

    def __init__(self, seed: str, account: str, grace_s: float) -> None:
        self._seed, self.account, self.grace_s = seed, account, grace_s

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainerCreds | None:
        """``None`` when no trainer key is configured (trainers then connect without credentials, as before)."""
        if settings.trainer_signing_seed_file is None or settings.nats_account is None:
            return None
        seed = settings.trainer_signing_seed_file.read_text().strip()  # read at start: a bad file stops the runner
        return cls(seed, settings.nats_account, settings.trainer_creds_grace_s)

    def issue(self, cmd: StartJob, job_dir: Path, now: float | None = None) -> Issued:
        """Mint the attempt's user (valid until now + timeout + grace) and write its creds into ``job_dir``."""
        expires = math.ceil((time.time() if now is None else now) + cmd.spec.timeout_s + self.grace_s)
        minted = mint_trainer(self._seed, self.account, cmd.spec.project, cmd.job_id, expires, attempt=cmd.attempt)
        path = write_secret(job_dir / CREDS_FILE, minted.creds)
        log.info("job %s attempt %s: trainer identity %s until %d", cmd.job_id, cmd.attempt, minted.public_key,
                 expires)
        return Issued(path, minted.inbox_prefix, minted.public_key, expires)


def sweep(jobs_dir: Path) -> int:
    """Delete creds an earlier runner process left behind (its trainers died with it); returns how many."""
    gone = 0
    for path in jobs_dir.glob(f"*/{CREDS_FILE}") if jobs_dir.is_dir() else ():
        path.unlink(missing_ok=True)
        gone += 1
    return gone

"""Who is calling: the authenticated principal every protected route receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .roles import Role


@dataclass
class Caller:
    """An authenticated user and what they may do; ``credential`` names the key or session (never a secret)."""

    user_id: str
    name: str
    is_owner: bool
    roles: dict[str, Role] = field(default_factory=dict)
    credential: str = ""
    via: Literal["key", "session", "oidc", "none"] = "key"
    key_id: str | None = None
    session_id: str | None = None
    csrf: str | None = None

    def role_in(self, project: str) -> Role | None:
        """The caller's role in ``project`` (the owner is an admin of every project)."""
        return Role.admin if self.is_owner else self.roles.get(project)

    def readable_projects(self) -> list[str] | None:
        """Projects the caller may read; ``None`` means every project (the owner)."""
        return None if self.is_owner else sorted(self.roles)

    def public(self) -> dict[str, object]:
        return {"id": self.user_id, "name": self.name, "is_owner": self.is_owner, "via": self.via,
                "credential": self.credential, "roles": {p: r.value for p, r in sorted(self.roles.items())}}

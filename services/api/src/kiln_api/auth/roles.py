"""Roles and what they allow (pure).

Per project: ``viewer`` reads jobs, metrics, logs and artifacts; ``member`` also creates, starts, cancels and re-runs
jobs; ``admin`` also manages members and keys. The instance ``owner`` creates projects and users and acts as an
admin of every project.

Example:
    >>> Role.member.allows(Role.viewer), Role.viewer.allows(Role.member)
    (True, False)
"""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    viewer = "viewer"
    member = "member"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """Whether someone with this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANK = {Role.viewer: 1, Role.member: 2, Role.admin: 3}

WHAT = {
    Role.viewer: "read jobs, metrics, logs and artifacts",
    Role.member: "create, start, cancel and re-run jobs",
    Role.admin: "manage members and keys",
}

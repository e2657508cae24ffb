"""Who is calling: a person (browser session or their API token), a legacy or bootstrap token,
or a machine. Built by the one authentication dependency (`gateway.api.auth`), handed to every
service function that acts or reads on someone's behalf.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.accounts.permissions import Permission, allows
from gateway.registry.models import Role

ACTOR_MAX = 64


class Actor(str):
    """The name an audit entry shows (an email, a token's name), carrying the exact ids of the
    person and the token behind it: `gateway.registry.audit.record` stores those beside the name, so
    every entry names who acted even where the name had to be shortened."""

    user_id: str | None
    token_id: str | None

    def __new__(cls, label: str, user_id: str | None = None, token_id: str | None = None) -> Actor:
        made = super().__new__(cls, label)
        made.user_id = user_id
        made.token_id = token_id
        return made


def actor_label(email: str, user_id: str, token_id: str | None = None) -> str:
    """'alice@example.com', or 'alice@example.com [at-0123456789]' for her token; an email too
    long for the audit columns is cut and ends with the user's id."""
    suffix = f" [{token_id}]" if token_id else ""
    label = email + suffix
    if len(label) <= ACTOR_MAX:
        return label
    tail = f"…({user_id}){suffix}"
    return email[: ACTOR_MAX - len(tail)] + tail


class PrincipalKind(StrEnum):
    session = "session"  # a person in a browser (session cookie)
    user_token = "user_token"  # noqa: S105  (a kind, not a secret) a person's API token
    legacy_token = "legacy_token"  # noqa: S105  an API token from before there were users
    bootstrap = "bootstrap"  # `edgefleet admin create-token`: only makes the first admin
    device = "device"  # a machine's JWT (device routes only)


@dataclass(frozen=True)
class Principal:
    kind: PrincipalKind
    actor: Actor
    role: Role | None = None
    user_id: str | None = None
    email: str | None = None
    customer_id: str | None = None
    token_id: str | None = None
    device_id: str | None = None
    #: The session's synchronizer token (cookie-authenticated callers only).
    csrf_token: str | None = None

    @property
    def is_customer(self) -> bool:
        return self.customer_id is not None

    @property
    def via_cookie(self) -> bool:
        return self.kind is PrincipalKind.session

    def may(self, permission: Permission) -> bool:
        if self.role is None or self.kind in (PrincipalKind.bootstrap, PrincipalKind.device):
            return False
        return allows(self.role, permission)

    @property
    def may_all_tokens(self) -> bool:
        return self.may(Permission.tokens_all)

    def sees_customer(self, customer_id: str | None) -> bool:
        """A manufacturer caller sees every customer and the stock; a customer's only its own."""
        return not self.is_customer or customer_id == self.customer_id

"""Bodies of the people-and-customers API: login, users, customers, support consent."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.accounts.consent import ConsentStatus
from gateway.accounts.customers import NAME_PATTERN
from gateway.accounts.models import Customer, SupportGrant, User
from gateway.accounts.principal import Principal
from gateway.accounts.users import EMAIL_PATTERN
from gateway.registry.models import Role

Email = Annotated[str, StringConstraints(min_length=3, max_length=254, pattern=EMAIL_PATTERN)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    password: Password


class Me(BaseModel):
    """Who the caller is."""

    kind: str = Field(description="session, user_token, legacy_token or bootstrap.")
    actor: str = Field(description="How the audit log names the caller.")
    user_id: str | None
    email: str | None
    role: Role | None
    customer_id: str | None
    token_id: str | None
    csrf_token: str | None = Field(
        description="Cookie sessions: send it as X-CSRF-Token (or the csrf_token form field) "
        "with every change."
    )

    @classmethod
    def of(cls, who: Principal) -> Me:
        return cls(
            kind=who.kind.value,
            actor=str(who.actor),
            user_id=who.user_id,
            email=who.email,
            role=who.role,
            customer_id=who.customer_id,
            token_id=who.token_id,
            csrf_token=who.csrf_token,
        )


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email
    role: Role
    customer: str | None = Field(default=None, max_length=64, description="Name or id.")
    password: Password | None = Field(
        default=None, description="At least 12 characters; none: single sign-on only."
    )


class UserOut(BaseModel):
    id: str
    email: str
    role: Role
    customer_id: str | None
    sso_linked: bool
    password_set: bool
    created_at: datetime
    created_by: str
    disabled_at: datetime | None
    last_login_at: datetime | None

    @classmethod
    def of(cls, row: User) -> UserOut:
        return cls(
            id=row.id,
            email=row.email,
            role=row.role,
            customer_id=row.customer_id,
            sso_linked=row.oidc_subject is not None,
            password_set=row.password_hash is not None,
            created_at=row.created_at,
            created_by=row.created_by,
            disabled_at=row.disabled_at,
            last_login_at=row.last_login_at,
        )


class CustomerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")  # the pattern looks ahead

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^(?!cus-)" + NAME_PATTERN.removeprefix("^"),
        description="1-64 letters, digits, spaces or _.&-, not starting with 'cus-'.",
    )


class CustomerOut(BaseModel):
    id: str
    name: str
    consent_required: bool
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, row: Customer) -> CustomerOut:
        return cls.model_validate(row, from_attributes=True)


class ConsentRequire(BaseModel):
    model_config = ConfigDict(extra="forbid")

    required: bool


class GrantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: int = Field(gt=0, description="How long support may connect, from now.")
    note: str = Field(default="", max_length=200)


class GrantOut(BaseModel):
    id: str
    starts_at: datetime
    ends_at: datetime
    granted_by: str
    note: str
    revoked_at: datetime | None
    revoked_by: str | None

    @classmethod
    def of(cls, row: SupportGrant) -> GrantOut:
        return cls.model_validate(row, from_attributes=True)


class ConsentOut(BaseModel):
    customer_id: str
    customer: str
    consent_required: bool
    open_now: bool = Field(description="Support may open tunnels to its machines right now.")
    active: GrantOut | None
    recent: list[GrantOut]

    @classmethod
    def of(cls, status: ConsentStatus) -> ConsentOut:
        customer = status.customer
        return cls(
            customer_id=customer.id,
            customer=customer.name,
            consent_required=customer.consent_required,
            open_now=not customer.consent_required or status.active is not None,
            active=GrantOut.of(status.active) if status.active else None,
            recent=[GrantOut.of(g) for g in status.recent],
        )


class RevokeOut(BaseModel):
    customer_id: str
    grants_revoked: int
    tunnels_closed: list[str]

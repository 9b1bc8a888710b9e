"""The API-key table of the HTTP API and its queries: a key is stored only as a hash.

A key reads `dsp_<id>_<secret>`. The id (12 hex digits) is public and finds the row; the
whole key's SHA-256 is what is kept, so the database never holds a usable key. Revoking
keeps the row (revoked_at) and frees the name for a new key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional, Sequence

from sqlalchemy import JSON, Column, Index, select, text, update
from sqlalchemy.orm import Session
from sqlmodel import Field, SQLModel

from .models import UTCDateTime, utcnow


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (
        # one active key per name; revoked ones keep theirs
        Index("uq_api_keys_active_name", "name", unique=True,
              sqlite_where=text("revoked_at IS NULL"), postgresql_where=text("revoked_at IS NULL")),
    )

    id: str = Field(primary_key=True, max_length=16)  # the public part of the key: dsp_<id>_...
    name: str = Field(max_length=100)
    key_hash: str = Field(max_length=64)  # hex SHA-256 of the whole key
    accounts: Optional[list[str]] = Field(default=None, sa_column=Column(JSON, nullable=True))  # None: every account
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    revoked_at: Optional[datetime] = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))


def add_key(session: Session, key: ApiKey) -> None:
    session.add(key)
    session.flush()


def key_by_id(session: Session, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def active_key(session: Session, name: str) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    return session.execute(stmt).scalars().first()


def all_keys(session: Session) -> Sequence[ApiKey]:
    return list(session.execute(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)).scalars())


def revoke(session: Session, name: str, now: datetime) -> int:
    """Revoke the active key of that name; returns 1, or 0 when there is none."""
    stmt = (update(ApiKey.__table__)  # type: ignore[attr-defined]
            .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
            .values(revoked_at=now))
    return session.execute(stmt).rowcount

"""Alembic environment: runs migrations on the URL the dispatcher passes in."""

from alembic import context
from sqlalchemy import create_engine, pool

from dispatcher.store import models  # noqa: F401  (registers the tables)
from dispatcher.store import api_keys  # noqa: F401  (the HTTP API's keys)
from sqlmodel import SQLModel

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    url = config.attributes["url"]
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=url.startswith("sqlite"),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()

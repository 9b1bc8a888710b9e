"""API keys of the HTTP API: a public id, a name, the SHA-256 of the key, the accounts it may use

Revision ID: 0006
Revises: 0005 (re-chained after 0005_campaigns when the campaign branch was merged in)
Create Date: 2026-11-30 13:30:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dispatcher.store.models


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'api_keys',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('accounts', sa.JSON(), nullable=True),
        sa.Column('created_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('uq_api_keys_active_name', 'api_keys', ['name'], unique=True,
                    sqlite_where=sa.text('revoked_at IS NULL'), postgresql_where=sa.text('revoked_at IS NULL'))


def downgrade() -> None:
    op.drop_index('uq_api_keys_active_name', table_name='api_keys')
    op.drop_table('api_keys')

"""the attempt record: claim token, claiming worker, request started, exposed key; worker heartbeats

A result is recorded only against the claim that produced it (claim_token); a dead worker
(no heartbeat in `workers`) is noticed in seconds, and its claims whose request never
started (started_at IS NULL) go back to the queue.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 13:20:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dispatcher.store.models


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('claim_token', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.add_column(sa.Column('started_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('key_exposed', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column('enqueued_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True))
        batch.create_index('ix_messages_claimed_by', ['claimed_by'], unique=False)
    with op.batch_alter_table('attempts') as batch:
        batch.add_column(sa.Column('claim_token', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch.add_column(sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.add_column(sa.Column('attempt_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.add_column(sa.Column('request_started', sa.Boolean(), nullable=False, server_default=sa.true()))
    op.create_table(
        'workers',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('last_seen', dispatcher.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('workers')
    with op.batch_alter_table('attempts') as batch:
        for column in ('request_started', 'attempt_key', 'worker', 'claim_token'):
            batch.drop_column(column)
    with op.batch_alter_table('messages') as batch:
        batch.drop_index('ix_messages_claimed_by')
        for column in ('enqueued_at', 'key_exposed', 'started_at', 'claimed_by', 'claim_token'):
            batch.drop_column(column)

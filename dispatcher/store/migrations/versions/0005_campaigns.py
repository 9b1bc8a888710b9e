"""bulk campaigns: the campaigns table, their skipped rows, and the campaign columns of messages

A campaign's messages carry its id, their line in the input and an optional time zone (the
`tz` column); they wait as `pending` until the campaign feeder hands them to the broker.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 10:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dispatcher.store.models


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'campaigns',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('template', sa.Text(), nullable=False),
        sa.Column('options', sa.JSON(), nullable=False),
        sa.Column('to_field', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('idempotency_key', sa.String(length=200), nullable=True),
        sa.Column('not_before', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('not_after', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('window', sqlmodel.sql.sqltypes.AutoString(length=11), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('invalid_count', sa.Integer(), nullable=False),
        sa.Column('segments', sa.Integer(), nullable=False),
        sa.Column('created_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('loaded_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('finished_at', dispatcher.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('idempotency_key', name='uq_campaigns_idempotency_key'),
    )
    op.create_index('ix_campaigns_state', 'campaigns', ['state'], unique=False)
    op.create_table(
        'campaign_errors',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('campaign_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('line', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_campaign_errors_campaign_id', 'campaign_errors', ['campaign_id'], unique=False)
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('campaign_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch.add_column(sa.Column('campaign_line', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('tz', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.create_index('ix_messages_campaign', ['campaign_id', 'status', 'due_at', 'campaign_line'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('messages') as batch:
        batch.drop_index('ix_messages_campaign')
        for column in ('tz', 'campaign_line', 'campaign_id'):
            batch.drop_column(column)
    op.drop_index('ix_campaign_errors_campaign_id', table_name='campaign_errors')
    op.drop_table('campaign_errors')
    op.drop_index('ix_campaigns_state', table_name='campaigns')
    op.drop_table('campaigns')

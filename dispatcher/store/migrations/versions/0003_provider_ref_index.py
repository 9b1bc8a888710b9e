"""index messages by (account, provider ref) for webhook lookups

A delivery webhook names the message by the provider's id; without this index every report
would scan all of its account's messages.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 10:00:00
"""
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_messages_provider_ref', 'messages', ['provider', 'provider_ref'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_messages_provider_ref', table_name='messages')

"""campaigns: the loading process's token and the last input line it stored

A load whose process died is taken as interrupted once its campaign row goes untouched for
a while; the same idempotency key resumes it after `last_line`, and `loader` fences out the
old process should it wake up.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 16:30:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('campaigns') as batch:
        batch.add_column(sa.Column('loader', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch.add_column(sa.Column('last_line', sa.Integer(), nullable=False, server_default='0'))
    # campaigns still loading (their loader maybe dead): the last line their chunks committed,
    # so that resuming them stores nothing twice
    op.execute("UPDATE campaigns SET last_line = COALESCE((SELECT MAX(m.campaign_line) FROM messages m "
               "WHERE m.campaign_id = campaigns.id), 0) WHERE loaded_at IS NULL")
    op.execute("UPDATE campaigns SET last_line = (SELECT MAX(e.line) FROM campaign_errors e "
               "WHERE e.campaign_id = campaigns.id) WHERE loaded_at IS NULL AND "
               "(SELECT MAX(e.line) FROM campaign_errors e WHERE e.campaign_id = campaigns.id) > last_line")


def downgrade() -> None:
    with op.batch_alter_table('campaigns') as batch:
        batch.drop_column('last_line')
        batch.drop_column('loader')

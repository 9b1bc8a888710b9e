"""messages: indexes that only the rows they serve pay for, and room on each page for updates

Every update that changes `status` writes a new entry in each of the table's indexes, and a
message changes status three times on its way out. The claimed_by, provider_ref and campaign
indexes now hold only rows that have a value there (a worker's claim, a provider's id, a
campaign), which are the only rows their queries look for. On PostgreSQL each page also keeps
a third free, so that an update of unindexed columns alone (the start of a request) stays on
its page and touches no index at all (a HOT update). docs/throughput.md has the figures.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

PARTIAL = (
    ('ix_messages_claimed_by', ['claimed_by'], 'claimed_by IS NOT NULL'),
    ('ix_messages_provider_ref', ['provider', 'provider_ref'], 'provider_ref IS NOT NULL'),
    ('ix_messages_campaign', ['campaign_id', 'status', 'due_at', 'campaign_line'], 'campaign_id IS NOT NULL'),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        for name, columns, where in PARTIAL:
            op.drop_index(name, table_name='messages')
            op.create_index(name, 'messages', columns, unique=False, sqlite_where=sa.text(where))
        return
    # Built beside the old index without blocking writes (a plain DROP INDEX locks the table
    # until the transaction ends: workers still sending would stall for the whole rebuild of
    # a large table), then swapped in; outside a transaction, as CONCURRENTLY requires.
    with op.get_context().autocommit_block():
        for name, columns, where in PARTIAL:
            op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name}_partial ON messages "
                       f"({', '.join(columns)}) WHERE {where}")
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            op.execute(f"ALTER INDEX {name}_partial RENAME TO {name}")
        op.execute('ALTER TABLE messages SET (fillfactor = 70)')  # pages written from now on


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE messages RESET (fillfactor)')
    for name, columns, _ in PARTIAL:
        op.drop_index(name, table_name='messages')
        op.create_index(name, 'messages', columns, unique=False)

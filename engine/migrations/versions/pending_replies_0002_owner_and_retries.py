"""pending_reply: the process holding an owed reply (owner, lease), and its delivery retries

A reply owed is held by one process at a time (owner + lease_until, renewed while it lives), so
several api processes sharing the database never carry on the same one; a failed delivery round
is counted (attempts, last_error) and retried at next_attempt_at, until given_up_at; runs counts
how often the request was carried on (re-runs after a restart).

Revision ID: pending_replies_0002
Revises: pending_replies_0001
Create Date: 2026-12-03 15:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'pending_replies_0002'
down_revision = 'pending_replies_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('pending_reply', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_until', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('runs', sa.Integer(), server_default='1', nullable=False))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), server_default='0',
                                      nullable=False))
        batch_op.add_column(sa.Column('next_attempt_at', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('last_error', sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column('given_up_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('pending_reply', schema=None) as batch_op:
        for name in ('given_up_at', 'last_error', 'next_attempt_at', 'attempts', 'runs',
                     'lease_until', 'owner'):
            batch_op.drop_column(name)

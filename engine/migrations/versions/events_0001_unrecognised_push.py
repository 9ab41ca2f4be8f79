"""Pushes nobody owns (engine/events.py), kept for discovery and security review

Revision ID: events_0001
Revises: 
Create Date: 2026-12-03 07:33:35.267698
"""
from alembic import op
import sqlalchemy as sa


revision = 'events_0001'
down_revision = None
branch_labels = ('events',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('unrecognised_push',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.BigInteger(), nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=False),
    sa.Column('identity', sa.String(length=128), nullable=True),
    sa.Column('problem', sa.String(length=32), nullable=False),
    sa.Column('reason', sa.String(length=255), nullable=False),
    sa.Column('length', sa.Integer(), nullable=False),
    sa.Column('head', sa.String(length=1024), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('unrecognised_push', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_unrecognised_push_problem'), ['problem'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('unrecognised_push', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_unrecognised_push_problem'))

    op.drop_table('unrecognised_push')

"""Invocation counters per meter and security events (engine/security.py)

Revision ID: security_0001
Revises: 
Create Date: 2026-12-03 07:35:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'security_0001'
down_revision = None
branch_labels = ('security',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('invocation_counter',
    sa.Column('device_mrid', sa.String(length=64), nullable=False),
    sa.Column('next_client', sa.BigInteger(), nullable=False),
    sa.Column('last_server', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('device_mrid')
    )
    op.create_table('security_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.BigInteger(), nullable=False),
    sa.Column('device_mrid', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_security_event_device_mrid'), 'security_event', ['device_mrid'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_security_event_device_mrid'), table_name='security_event')
    op.drop_table('security_event')
    op.drop_table('invocation_counter')

"""Meters behind data concentrators: a device's physical address and network id there, and a
route's concentrator (host, port, network id) and its own session bound

Columns of the store's device and route tables, in a branch of their own ("gateway", owned by
the concentrator work: drivers/concentrator.py, engine/inventory.py) so that they never collide
with the store branch's numbering.

Revision ID: gateway_0001
Revises:
Create Date: 2026-12-03 10:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'gateway_0001'
down_revision = None
branch_labels = ('gateway',)
depends_on = 'store_0003'


def upgrade() -> None:
    op.add_column('device', sa.Column('physical_address', sa.String(length=128), nullable=True))
    op.add_column('device', sa.Column('network_id', sa.Integer(), nullable=True))
    op.add_column('route', sa.Column('host', sa.String(length=255), nullable=True))
    op.add_column('route', sa.Column('port', sa.Integer(), nullable=True))
    op.add_column('route', sa.Column('network_id', sa.Integer(), nullable=True))
    op.add_column('route', sa.Column('max_sessions', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('route') as batch:
        batch.drop_column('max_sessions')
        batch.drop_column('network_id')
        batch.drop_column('port')
        batch.drop_column('host')
    with op.batch_alter_table('device') as batch:
        batch.drop_column('network_id')
        batch.drop_column('physical_address')

"""Meters' low-voltage network positions and summarised feeder outages (engine/feeder_outages.py)

Revision ID: feeder_outages_0001
Revises: 
Create Date: 2026-12-03 10:05:18.699110
"""
from alembic import op
import sqlalchemy as sa


revision = 'feeder_outages_0001'
down_revision = None
branch_labels = ('feeder_outages',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('feeder_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('feeder', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('episode', sa.Integer(), nullable=False),
    sa.Column('at', sa.BigInteger(), nullable=False),
    sa.Column('last_at', sa.BigInteger(), nullable=False),
    sa.Column('meters', sa.Integer(), nullable=False),
    sa.Column('detected_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('feeder', 'kind', 'episode')
    )
    op.create_table('network_position',
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('transformer', sa.String(length=64), nullable=True),
    sa.Column('feeder', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('device_id')
    )
    with op.batch_alter_table('network_position', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_network_position_feeder'), ['feeder'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('network_position', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_network_position_feeder'))

    op.drop_table('network_position')
    op.drop_table('feeder_event')

"""route_lease (engine/route_leases.py): session slots per route shared by engine processes

Revision ID: route_leases_0001
Revises: 
Create Date: 2026-12-03 09:55:38.251259
"""
from alembic import op
import sqlalchemy as sa


revision = 'route_leases_0001'
down_revision = None
branch_labels = ('route_leases',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('route_lease',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('route', sa.String(length=128), nullable=False),
    sa.Column('engine_id', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('route_lease', schema=None) as batch_op:
        batch_op.create_index('ix_route_lease_engine', ['engine_id'], unique=False)
        batch_op.create_index('ix_route_lease_route', ['route', 'expires_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('route_lease', schema=None) as batch_op:
        batch_op.drop_index('ix_route_lease_route')
        batch_op.drop_index('ix_route_lease_engine')

    op.drop_table('route_lease')

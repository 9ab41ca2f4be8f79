"""Device status: last successful read, last error, broken mark (engine/device_status.py)

Revision ID: device_status_0001
Revises: 
Create Date: 2026-12-03 07:32:10.505084
"""
from alembic import op
import sqlalchemy as sa


revision = 'device_status_0001'
down_revision = None
branch_labels = ('device_status',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('device_status',
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('last_success_at', sa.BigInteger(), nullable=True),
    sa.Column('last_error_at', sa.BigInteger(), nullable=True),
    sa.Column('last_error_kind', sa.String(length=64), nullable=True),
    sa.Column('last_error_message', sa.String(length=512), nullable=True),
    sa.Column('broken', sa.Boolean(), nullable=False),
    sa.Column('broken_note', sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('device_id')
    )


def downgrade() -> None:
    op.drop_table('device_status')

"""device: the password and HLS keys sealed at rest (engine/sealed.py), in columns of their own

The plain-text values are not carried over: the migration has no key to seal them with, and
every start loads the inventory again, which writes each device's secrets sealed. Columns are
added and dropped (not altered in place) because SQLite cannot change a column's type without
copying the table, which the readings' foreign keys forbid.

Revision ID: store_0003
Revises: store_0002
Create Date: 2026-12-03 07:45:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'store_0003'
down_revision = 'store_0002'
branch_labels = None
depends_on = None

_SECRETS = (("password", 64), ("encryption_key", 32), ("authentication_key", 32))


def upgrade() -> None:
    for name, _length in _SECRETS:
        op.add_column('device', sa.Column(f'sealed_{name}', sa.String(length=512), nullable=True))
        op.drop_column('device', name)


def downgrade() -> None:
    for name, length in _SECRETS:
        op.add_column('device', sa.Column(name, sa.String(length=length), nullable=True))
        op.drop_column('device', f'sealed_{name}')

"""device: "authentication" becomes "security" (none / low / hls-gmac), with the HLS-GMAC system
title and keys (hex) of each meter

Revision ID: store_0002
Revises: store_0001
Create Date: 2026-12-03 07:35:00
"""
from alembic import op
import sqlalchemy as sa


revision = 'store_0002'
down_revision = 'store_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # RENAME COLUMN is the same statement on SQLite (3.25+) and PostgreSQL, and keeps the rows.
    op.execute("ALTER TABLE device RENAME COLUMN authentication TO security")
    op.add_column('device', sa.Column('system_title', sa.String(length=16), nullable=True))
    op.add_column('device', sa.Column('encryption_key', sa.String(length=32), nullable=True))
    op.add_column('device', sa.Column('authentication_key', sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device') as batch:
        batch.drop_column('authentication_key')
        batch.drop_column('encryption_key')
        batch.drop_column('system_title')
    op.execute("ALTER TABLE device RENAME COLUMN security TO authentication")

"""pending_reply (engine/pending_replies.py): asynchronous outcomes still owed to a ReplyAddress

Revision ID: pending_replies_0001
Revises: 
Create Date: 2026-12-03 13:20:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = 'pending_replies_0001'
down_revision = None
branch_labels = ('pending_replies',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('pending_reply',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('noun', sa.String(length=64), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('reply_address', sa.String(length=1024), nullable=False),
    sa.Column('correlation_id', sa.String(length=256), nullable=True),
    sa.Column('request_xml', sa.Text(), nullable=False),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('sent_at', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('pending_reply', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pending_reply_noun'), ['noun'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('pending_reply', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pending_reply_noun'))

    op.drop_table('pending_reply')

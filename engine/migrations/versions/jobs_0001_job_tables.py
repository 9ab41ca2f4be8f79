"""Job requests and jobs (engine/jobs.py): the engine's durable work

Revision ID: jobs_0001
Revises: 
Create Date: 2026-12-03 07:33:16.961973
"""
from alembic import op
import sqlalchemy as sa


revision = 'jobs_0001'
down_revision = None
branch_labels = ('jobs',)
depends_on = 'store_0001'


def upgrade() -> None:
    op.create_table('job_request',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('schedule', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('deadline', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_table('job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('device_mrid', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=128), nullable=True),
    sa.Column('reading_types', sa.JSON(), nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=True),
    sa.Column('window_end', sa.BigInteger(), nullable=True),
    sa.Column('read_start', sa.BigInteger(), nullable=True),
    sa.Column('read_end', sa.BigInteger(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('rereads', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.BigInteger(), nullable=False),
    sa.Column('deadline', sa.BigInteger(), nullable=True),
    sa.Column('last_error', sa.String(length=1024), nullable=True),
    sa.Column('missing', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('started_at', sa.BigInteger(), nullable=True),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['job_request.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id', 'device_mrid', 'kind')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.create_index('ix_job_due', ['state', 'priority', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_request_id'), ['request_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_request_id'))
        batch_op.drop_index('ix_job_due')

    op.drop_table('job')
    op.drop_table('job_request')

"""Control jobs: each control job's command, who asked, its attempts and final outcome
(engine/controls.py); refers to the job table of the jobs branch.

Revision ID: controls_0001
Revises: 
Create Date: 2026-12-03 10:14:49.767666
"""
from alembic import op
import sqlalchemy as sa


revision = 'controls_0001'
down_revision = None
branch_labels = ('controls',)
depends_on = 'jobs_0001'


def upgrade() -> None:
    op.create_table('control_job',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('command', sa.JSON(), nullable=False),
    sa.Column('user', sa.String(length=128), nullable=True),
    sa.Column('correlation_id', sa.String(length=256), nullable=True),
    sa.Column('due_at', sa.BigInteger(), nullable=False),
    sa.Column('attempts_started', sa.Integer(), nullable=False),
    sa.Column('last_started_at', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('reason', sa.String(length=1024), nullable=True),
    sa.Column('read_back', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('error_kind', sa.String(length=64), nullable=True),
    sa.Column('finished_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['job.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('job_id')
    )


def downgrade() -> None:
    op.drop_table('control_job')

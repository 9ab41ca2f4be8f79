"""The store: devices, routes, groups, usage points, readings and their corrections, events, requests, outbox

Revision ID: store_0001
Revises: 
Create Date: 2026-12-03 06:54:05.451922
"""
from alembic import op
import sqlalchemy as sa


revision = 'store_0001'
down_revision = None
branch_labels = ('store',)
depends_on = None


# A stored reading replaced by a different value leaves its trace in reading_correction, written
# by the database in the statement that replaced it: every writer (the bulk upsert, a manual
# UPDATE) is traced, and storing the same value again (the upsert's WHERE excludes it, and the
# trigger's WHEN too) writes nothing.
_CORRECTION_COLUMNS = ("reading_id, old_value, old_read_at, old_source, new_value, corrected_at, "
                       "source")
_CORRECTION_VALUES = ("OLD.id, OLD.value, OLD.read_at, OLD.source, NEW.value, NEW.read_at, "
                      "NEW.source")
_SQLITE_TRIGGER = f"""
CREATE TRIGGER reading_correction_trace AFTER UPDATE OF value ON reading
FOR EACH ROW WHEN OLD.value IS NOT NEW.value
BEGIN
    INSERT INTO reading_correction ({_CORRECTION_COLUMNS}) VALUES ({_CORRECTION_VALUES});
END
"""
_POSTGRESQL_FUNCTION = f"""
CREATE FUNCTION reading_correction_trace() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO reading_correction ({_CORRECTION_COLUMNS}) VALUES ({_CORRECTION_VALUES});
    RETURN NULL;
END
$$
"""
_POSTGRESQL_TRIGGER = """
CREATE TRIGGER reading_correction_trace AFTER UPDATE OF value ON reading
FOR EACH ROW WHEN (OLD.value IS DISTINCT FROM NEW.value)
EXECUTE FUNCTION reading_correction_trace()
"""


def upgrade() -> None:
    op.create_table('device_group',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('mrid', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mrid'),
    sa.UniqueConstraint('name')
    )
    op.create_table('request',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=128), nullable=True),
    sa.Column('correlation_id', sa.String(length=128), nullable=True),
    sa.Column('noun', sa.String(length=64), nullable=False),
    sa.Column('verb', sa.String(length=16), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=True),
    sa.Column('reply_address', sa.String(length=1024), nullable=True),
    sa.Column('received_at', sa.BigInteger(), nullable=False),
    sa.Column('replied_at', sa.BigInteger(), nullable=True),
    sa.Column('result', sa.String(length=16), nullable=True),
    sa.Column('devices_asked', sa.Integer(), nullable=False),
    sa.Column('devices_failed', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('request', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_request_correlation_id'), ['correlation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_request_message_id'), ['message_id'], unique=False)

    op.create_table('route',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('usage_point',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mrid', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mrid')
    )
    with op.batch_alter_table('usage_point', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_point_name'), ['name'], unique=False)

    op.create_table('device',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('mrid', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('device_type', sa.String(length=64), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('client_address', sa.Integer(), nullable=False),
    sa.Column('server_address', sa.Integer(), nullable=False),
    sa.Column('authentication', sa.String(length=16), nullable=False),
    sa.Column('password', sa.String(length=64), nullable=True),
    sa.Column('route_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['route_id'], ['route.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('mrid')
    )
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_device_route_id'), ['route_id'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('correlation_id', sa.String(length=128), nullable=True),
    sa.Column('request_id', sa.Integer(), nullable=True),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.BigInteger(), nullable=False),
    sa.Column('published_at', sa.BigInteger(), nullable=True),
    sa.Column('last_error', sa.String(length=1024), nullable=True),
    sa.ForeignKeyConstraint(['request_id'], ['request.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_pending', ['destination', 'published_at', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_outbox_request_id'), ['request_id'], unique=False)

    op.create_table('device_group_member',
    sa.Column('group_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['group_id'], ['device_group.id'], ),
    sa.PrimaryKeyConstraint('group_id', 'device_id')
    )
    with op.batch_alter_table('device_group_member', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_device_group_member_device_id'), ['device_id'], unique=False)

    op.create_table('end_device_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('dlms_code', sa.Integer(), nullable=True),
    sa.Column('log', sa.String(length=64), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('read_at', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'log', 'created_at', 'dlms_code')
    )
    with op.batch_alter_table('end_device_event', schema=None) as batch_op:
        batch_op.create_index('ix_end_device_event_device_time', ['device_id', 'created_at'], unique=False)

    op.create_table('reading',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('reading_type', sa.String(length=64), nullable=False),
    sa.Column('timestamp', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.String(length=40), nullable=False),
    sa.Column('read_at', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_id', 'reading_type', 'timestamp')
    )
    op.create_table('usage_point_meter',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('usage_point_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('served_from', sa.BigInteger(), nullable=False),
    sa.Column('served_to', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['device_id'], ['device.id'], ),
    sa.ForeignKeyConstraint(['usage_point_id'], ['usage_point.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('usage_point_id', 'served_from')
    )
    with op.batch_alter_table('usage_point_meter', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_usage_point_meter_device_id'), ['device_id'], unique=False)

    op.create_table('reading_correction',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('reading_id', sa.Integer(), nullable=False),
    sa.Column('old_value', sa.String(length=40), nullable=False),
    sa.Column('old_read_at', sa.BigInteger(), nullable=False),
    sa.Column('old_source', sa.String(length=32), nullable=False),
    sa.Column('new_value', sa.String(length=40), nullable=False),
    sa.Column('corrected_at', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.ForeignKeyConstraint(['reading_id'], ['reading.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reading_correction', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reading_correction_reading_id'), ['reading_id'], unique=False)

    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute(_SQLITE_TRIGGER)
    elif dialect == "postgresql":
        op.execute(_POSTGRESQL_FUNCTION)
        op.execute(_POSTGRESQL_TRIGGER)
    else:
        raise NotImplementedError(f"no reading correction trigger written for {dialect}")


def downgrade() -> None:
    op.execute("DROP TRIGGER reading_correction_trace" +
               (" ON reading" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION reading_correction_trace()")
    with op.batch_alter_table('reading_correction', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reading_correction_reading_id'))

    op.drop_table('reading_correction')
    with op.batch_alter_table('usage_point_meter', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_point_meter_device_id'))

    op.drop_table('usage_point_meter')
    op.drop_table('reading')
    with op.batch_alter_table('end_device_event', schema=None) as batch_op:
        batch_op.drop_index('ix_end_device_event_device_time')

    op.drop_table('end_device_event')
    with op.batch_alter_table('device_group_member', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_group_member_device_id'))

    op.drop_table('device_group_member')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_outbox_request_id'))
        batch_op.drop_index('ix_outbox_pending')

    op.drop_table('outbox')
    with op.batch_alter_table('device', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_device_route_id'))
        batch_op.drop_index(batch_op.f('ix_device_name'))

    op.drop_table('device')
    with op.batch_alter_table('usage_point', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_usage_point_name'))

    op.drop_table('usage_point')
    op.drop_table('route')
    with op.batch_alter_table('request', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_request_message_id'))
        batch_op.drop_index(batch_op.f('ix_request_correlation_id'))

    op.drop_table('request')
    op.drop_table('device_group')

"""metric rows per event: ``metrics`` (one row per point) becomes ``metric_events`` (one row per event, JSON values)

One row per point cost PostgreSQL 20-25 us per point maintaining two indexes under ON CONFLICT; one row per event
with the points as JSON(B) is several times cheaper (docs/performance.md, "Metrics writer").  Existing points are
grouped by event id.  Non-finite values: PostgreSQL turns a float8 NaN/Infinity into the JSON strings "NaN" /
"Infinity" (what the writer stores too); SQLite stored NaN as NULL already (JSON null).

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('metric_events',
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('values', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    with op.batch_alter_table('metric_events', schema=None) as batch_op:
        batch_op.create_index('ix_metric_events_job_step', ['job_id', 'step'], unique=False)

    if op.get_bind().dialect.name == 'postgresql':
        agg = 'jsonb_object_agg(key, value)'  # float8 NaN / Infinity become the strings "NaN" / "Infinity"
    else:  # SQLite would write an infinity as Inf (not JSON): the string, as on PostgreSQL and from the writer
        agg = ("json_group_object(key, CASE WHEN value > 1.7976931348623157e308 THEN 'Infinity' "
               "WHEN value < -1.7976931348623157e308 THEN '-Infinity' ELSE value END)")
    op.execute(
        'INSERT INTO metric_events (event_id, job_id, attempt, kind, step, time, "values") '
        f'SELECT event_id, min(job_id), min(attempt), min(kind), min(step), min(time), {agg} '
        'FROM metrics GROUP BY event_id'
    )

    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.drop_index('ix_metrics_job_key_step')

    op.drop_table('metrics')


def downgrade() -> None:
    op.create_table('metrics',
    sa.Column('event_id', sa.String(length=128), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id', 'key')
    )
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.create_index('ix_metrics_job_key_step', ['job_id', 'key', 'step'], unique=False)

    if op.get_bind().dialect.name == 'postgresql':
        points, value = 'jsonb_each_text(m."values") AS p', 'p.value::float8'
    else:  # SQLite stores NaN as NULL: "NaN" becomes NULL, the infinities floats again
        points = 'json_each(m."values") AS p'
        value = ("CASE WHEN p.type IN ('integer', 'real') THEN p.value WHEN p.value = 'Infinity' THEN 9e999 "
                 "WHEN p.value = '-Infinity' THEN -9e999 END")
    op.execute(
        'INSERT INTO metrics (event_id, key, job_id, attempt, kind, step, value, time) '
        f'SELECT m.event_id, p.key, m.job_id, m.attempt, m.kind, m.step, {value}, m.time '
        f'FROM metric_events AS m CROSS JOIN {points}'
    )

    with op.batch_alter_table('metric_events', schema=None) as batch_op:
        batch_op.drop_index('ix_metric_events_job_step')

    op.drop_table('metric_events')

"""event credentials: read-only NATS credentials of third-party subscribers, one row per issue

Only what identifies and bounds a credential is kept: the NATS user's public key (what a revocation names), the
consumer name, the project, who created it, and when it was created, expires and was revoked.  The ``.creds``
text (the user JWT and its seed) is shown once, in the answer that creates it, and stored nowhere.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('event_credentials',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('public_key', sa.String(length=64), nullable=False),
    sa.Column('created_by', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('public_key'),
    )
    op.create_index('ix_event_credentials_project_name', 'event_credentials', ['project_id', 'name'])


def downgrade() -> None:
    op.drop_index('ix_event_credentials_project_name', table_name='event_credentials')
    op.drop_table('event_credentials')

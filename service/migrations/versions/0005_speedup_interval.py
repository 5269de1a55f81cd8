"""speed-up interval and noisy verdict on candidates

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('candidates') as batch:
        batch.add_column(sa.Column('speedup_low', sa.Float(), nullable=True))
        batch.add_column(sa.Column('speedup_high', sa.Float(), nullable=True))
        batch.add_column(sa.Column('noisy', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('candidates') as batch:
        batch.drop_column('noisy')
        batch.drop_column('speedup_high')
        batch.drop_column('speedup_low')

"""Alembic environment: runs on the connection service.db.migrate() hands over."""

from alembic import context

from service.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # invoked by the alembic command line
    from service.db import get_engine

    connection = get_engine(config.get_main_option("sqlalchemy.url")).connect()

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()

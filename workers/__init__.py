"""Kiln workers: the conversion engine, Celery tasks and the `kiln` command. Imports `service`, never the reverse."""

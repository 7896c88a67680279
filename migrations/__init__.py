"""Alembic migrations for the smapq queue (installed as the package ``smapq_migrations``)."""

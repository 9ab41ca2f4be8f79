"""Alembic's environment and the revisions of cimhes's schema (see cimhes.engine.schema)."""

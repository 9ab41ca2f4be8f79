"""Schema revisions, one Alembic branch per owning module (file names start with the branch)."""

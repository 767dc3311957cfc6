"""The deploy checks run KEDA's query on both databases: the core tests' database fixtures."""

from tests.core.conftest import db_url, pg_available, pg_session_url  # noqa: F401

"""The server fixtures are the server tests' own (imported, not copied)."""

from tests.server.conftest import server, server_factory, tiny_model  # noqa: F401 (fixtures)

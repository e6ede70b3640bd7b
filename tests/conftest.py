"""Shared pytest setup. Fixtures live in tests/fixtures/, one module per kind of real resource."""

pytest_plugins = (
    "fixtures.data",
    "fixtures.broker",
    "fixtures.database",
    "fixtures.fleet",
    "fixtures.model_inputs",
    "fixtures.rabbitmq",
)

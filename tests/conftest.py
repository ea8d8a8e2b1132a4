"""Shared test configuration. Real servers are started by the fixture plugins listed here."""

pytest_plugins = [
    "tests.support.keyword_servers",
    "tests.support.milvus_servers",
    "tests.support.embed_server",
    "tests.support.postgres_servers",
    "tests.support.kafka_servers",
    "tests.support.chaos_report",
    "tests.support.container_image",
]

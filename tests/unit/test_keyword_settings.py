"""How keyword settings name a generation's index and the readers' alias, for each kind."""

from __future__ import annotations

from adapters.keyword.settings import KeywordSettings


def test_tantivy_names_are_paths_beside_the_configured_directory() -> None:
    """Tantivy: the alias is a file beside the index directory, generations are directories."""
    kw = KeywordSettings(kind="tantivy", path="data/tantivy/", index="chunks")
    assert kw.live_alias == "data/tantivy.live"
    assert kw.physical_base == "data/tantivy"
    assert kw.for_physical("data/tantivy-g2").path == "data/tantivy-g2"
    assert kw.for_physical("data/tantivy-g2").index == "chunks"


def test_search_engine_names_are_index_names() -> None:
    """OpenSearch/Elasticsearch: the alias and the generations are index names."""
    kw = KeywordSettings(kind="opensearch", url="http://localhost:9200", index="chunks")
    assert kw.live_alias == "chunks-live"
    assert kw.physical_base == "chunks"
    assert kw.for_physical("chunks-g2").index == "chunks-g2"


def test_a_configured_alias_wins() -> None:
    """An explicit ``alias`` is what readers query, whatever the kind."""
    assert KeywordSettings(kind="tantivy", path="data/kw", alias="data/readers").live_alias == "data/readers"
    assert KeywordSettings(kind="elasticsearch", url="http://es:9200", alias="live").live_alias == "live"


def test_only_tantivy_is_embedded() -> None:
    """A Tantivy directory is written inside the process; a search engine is a server."""
    assert KeywordSettings(kind="tantivy", path="data/kw").is_embedded
    assert not KeywordSettings(kind="opensearch", url="http://localhost:9200").is_embedded
    assert not KeywordSettings(kind="elasticsearch", url="http://es:9200").is_embedded

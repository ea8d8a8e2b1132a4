"""Where generations schedules put their stores: a run's servers, and each schedule's names on them.

A generations schedule needs an OpenSearch/Elasticsearch keyword index (the rebuild writes the
new generation beside the live service, and a Tantivy directory admits one writer) and a Milvus
server or a milvus-lite file (one per worker process, which hosts both the rebuild and the
service). ``managed_stores`` starts a worker's own servers; ``GenStores.settings`` names one
schedule's index, collection, ledger and aliases after the run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.util import Finalize
from pathlib import Path
from typing import Any

from adapters.keyword.settings import KeywordSettings
from adapters.vector.settings import VectorSettings
from chaos.rig import EMBED_DIM
from chaos.workload import CHUNK_CHARS_MAX
from lockstep.settings import ChunkingConfig, EmbedderSettings, LedgerSettings, RebuildSettings, Settings

# Documents per backfill batch: small, so a schedule's backfill has several batches to interleave.
REBUILD_BATCH_DOCS = 3
# Worker-exit finalizers run in decreasing priority; a worker's servers have no ordering needs.
FINALIZE_PRIORITY = 10


@dataclass(frozen=True)
class GenStores:
    """The servers of a run: an OpenSearch/Elasticsearch keyword index and a Milvus server, or
    ``vector`` None for a milvus-lite file in each worker's directory. Each schedule names its
    own index and collection after them (picklable, for worker processes)."""

    keyword: KeywordSettings
    vector: VectorSettings | None

    def settings(self, workdir: Path, namespace: str) -> Settings:
        """A schedule's lockstep settings: its own index, collection, ledger and aliases."""
        keyword = self.keyword.model_copy(update={"index": f"{self.keyword.index}-chaos-{namespace}", "alias": None})
        if self.vector is None:
            vector = VectorSettings(uri=str(workdir / "milvus.db"), collection=f"lockstep_chaos_{namespace}")
        else:
            collection = f"{self.vector.collection}_chaos_{namespace}".replace("-", "_")
            vector = self.vector.model_copy(update={"collection": collection, "alias": None})
        return Settings(
            keyword=keyword,
            vector=vector,
            ledger=LedgerSettings(path=str(workdir / f"{namespace}.ledger.db")),
            embedder=EmbedderSettings(kind="hashing", dim=EMBED_DIM),
            chunking=ChunkingConfig(max_chars=CHUNK_CHARS_MAX),
            rebuild=RebuildSettings(batch_docs=REBUILD_BATCH_DOCS),
        )



def managed_stores(workdir: Path, milvus_kind: str) -> GenStores:
    """Start this worker's OpenSearch-API server (and Milvus server); stopped when the worker exits."""
    from chaos.servers import MilvusLiteServer, OpenSearchApiServer, RealMilvusServer

    servers: list[Any] = [OpenSearchApiServer(log_path=workdir / "osmem.log")]
    if milvus_kind == "lite":
        servers.append(MilvusLiteServer(workdir / "milvus-data"))
    elif milvus_kind == "2.3.5":
        (workdir / "milvus-2.3.5").mkdir(parents=True, exist_ok=True)
        servers.append(RealMilvusServer(workdir / "milvus-2.3.5"))
    for server in servers:
        server.start()
        Finalize(server, server.kill9, exitpriority=FINALIZE_PRIORITY)
    keyword = KeywordSettings(kind="opensearch", url=servers[0].url, index="lockstep")
    vector = VectorSettings(uri=servers[1].uri, collection="lockstep") if len(servers) > 1 else None
    return GenStores(keyword, vector)

"""Schedules against the stores named in a lockstep config (``lockstep chaos run -c FILE``).

Each schedule writes to its own keyword index (``<index>-chaos-<namespace>``) and its own Milvus
collection (``<collection>_chaos_<namespace>``) on the configured servers, and drops both after
its checks, so a deployment's real index is never touched. An embedded side (a Tantivy
directory, a milvus-lite ``.db`` file) runs in the worker's own work directory instead of the
configured path, whatever the other side is: a milvus-lite file admits a single process, so
workers sharing the configured one would all but one fail to open it. The
ledger is always a fresh SQLite file per schedule, and the embedder is always the hashing one
behind the fault injector: the suite tests lockstep's protocol and the stores, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.keyword.settings import KeywordSettings
from adapters.vector.milvus import MilvusVectorIndex
from adapters.vector.settings import VectorSettings
from chaos.rig import EMBED_DIM
from chaos.runner import EmbeddedStores
from lockstep.bootstrap import build_keyword, build_vector
from lockstep.settings import Settings

# The worker's own milvus-lite file, in its work directory (the one EmbeddedStores uses).
EMBEDDED_VECTOR_FILE = "milvus.db"


@dataclass
class ConfiguredStores:
    keyword: Any
    vector: MilvusVectorIndex

    def close(self) -> None:
        self.keyword.drop()
        self.keyword.close()
        self.vector.drop()
        self.vector.close()


@dataclass(frozen=True)
class DeploymentOpener:
    """Opens a schedule's stores where ``settings`` says: its own index and collection on the
    servers, its own directory or file in the worker's ``workdir`` for an embedded side (picklable,
    for worker processes)."""

    settings: Settings

    def __call__(self, workdir: Path, namespace: str) -> Any:
        if self.settings.keyword.is_embedded and self.settings.vector.is_embedded:
            return EmbeddedStores.open(workdir, namespace)
        keyword = build_keyword(self._keyword_settings(workdir, namespace))
        vector = build_vector(self._vector_settings(workdir, namespace), dim=EMBED_DIM)
        keyword.ensure()
        vector.ensure()
        return ConfiguredStores(keyword, vector)

    def _keyword_settings(self, workdir: Path, namespace: str) -> KeywordSettings:
        """The schedule's own index on the server, or its own Tantivy directory in ``workdir``."""
        return self.settings.keyword.model_copy(
            update={"index": f"{self.settings.keyword.index}-chaos-{namespace}", "path": str(workdir / namespace)}
        )

    def _vector_settings(self, workdir: Path, namespace: str) -> VectorSettings:
        """The schedule's own collection, on the server or in the worker's milvus-lite file."""
        update = {"collection": f"{self.settings.vector.collection}_chaos_{namespace}".replace("-", "_")}
        if self.settings.vector.is_embedded:
            update["uri"] = str(workdir / EMBEDDED_VECTOR_FILE)
        return self.settings.vector.model_copy(update=update)

"""Schedules against the stores named in a lockstep config (``lockstep chaos run -c FILE``).

Each schedule writes to its own keyword index (``<index>-chaos-<namespace>``) and its own Milvus
collection (``<collection>_chaos_<namespace>``) on the configured servers, and drops both after
its checks, so a deployment's real index is never touched. An embedded config (Tantivy, a
milvus-lite ``.db`` file) runs in the chaos work directory instead of the configured paths. The
ledger is always a fresh SQLite file per schedule, and the embedder is always the hashing one
behind the fault injector: the suite tests lockstep's protocol and the stores, not a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.vector.milvus import MilvusVectorIndex
from chaos.rig import EMBED_DIM
from chaos.runner import EmbeddedStores
from lockstep.bootstrap import build_keyword
from lockstep.settings import Settings


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
    """Opens a schedule's stores on the servers ``settings`` names (picklable, for worker processes)."""

    settings: Settings

    def __call__(self, workdir: Path, namespace: str) -> Any:
        if self.settings.keyword.kind == "tantivy" and self.settings.vector.uri.endswith(".db"):
            return EmbeddedStores.open(workdir, namespace)
        keyword_settings = self.settings.keyword.model_copy(
            update={
                "index": f"{self.settings.keyword.index}-chaos-{namespace}",
                "path": str(workdir / namespace),
            }
        )
        vector_settings = self.settings.vector.model_copy(
            update={"collection": f"{self.settings.vector.collection}_chaos_{namespace}".replace("-", "_")}
        )
        keyword = build_keyword(keyword_settings)
        vector = MilvusVectorIndex(vector_settings, dim=EMBED_DIM)
        keyword.ensure()
        vector.ensure()
        return ConfiguredStores(keyword, vector)

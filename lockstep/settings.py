"""lockstep's one settings object: a YAML file, overridden by ``LOCKSTEP_*`` environment variables.

Nested keys use ``__`` in variable names, e.g. ``LOCKSTEP_KEYWORD__PASSWORD`` or
``LOCKSTEP_VECTOR__TOKEN``, so credentials can come from Kubernetes Secrets instead of the file.
Adapters never read the environment; only this module does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.embedders.settings import EmbedderSettings as EmbedderSettings
from adapters.keyword.settings import KeywordSettings
from adapters.ledger.settings import PostgresLedgerSettings
from adapters.sources import webhook
from adapters.sources.debezium import KafkaSourceSettings
from adapters.sources.pg_logical.settings import PgLogicalSourceSettings as PgLogicalSourceSettings
from adapters.sources.settings import FolderSourceSettings as FolderSourceSettings
from adapters.sources.settings import JsonlSourceSettings as JsonlSourceSettings
from adapters.sources.settings import SqlSourceSettings as SqlSourceSettings
from adapters.sources.webhook.settings import TOKEN_REQUIRED
from adapters.sources.webhook.settings import WebhookSourceSettings as WebhookSourceSettings
from adapters.vector.settings import VectorSettings
from coordinator import search as search_domain
from coordinator.chunking import ChunkingSettings
from coordinator.errors import ConfigError
from coordinator.fusion import RRF_K_DEFAULT
from coordinator.limits import CHUNK_CHARS_MAX
from coordinator.redact import register_secrets

if TYPE_CHECKING:
    from pydantic_settings import PydanticBaseSettingsSource

DEFAULT_DATA_DIR = "./lockstep-data"
DEFAULT_TANTIVY_PATH = f"{DEFAULT_DATA_DIR}/tantivy"
DEFAULT_MILVUS_URI = f"{DEFAULT_DATA_DIR}/milvus.db"


# Resources Ray manages itself; an actor asks for them with options of their own.
RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


SourceSettings = Annotated[
    JsonlSourceSettings
    | FolderSourceSettings
    | SqlSourceSettings
    | WebhookSourceSettings
    | PgLogicalSourceSettings
    | KafkaSourceSettings,
    Field(discriminator="kind"),
]


class LedgerSettings(_Frozen):
    kind: Literal["sqlite"] = "sqlite"
    path: str = f"{DEFAULT_DATA_DIR}/ledger.db"


def _ledger_kind(value: Any) -> str:
    """``kind`` may be left out: the embedded SQLite ledger is the default."""
    if isinstance(value, dict):
        return str(value.get("kind", "sqlite"))
    return str(getattr(value, "kind", "sqlite"))


AnyLedgerSettings = Annotated[
    Annotated[LedgerSettings, Tag("sqlite")] | Annotated[PostgresLedgerSettings, Tag("postgres")],
    Discriminator(_ledger_kind),
]


class ChunkingConfig(_Frozen):
    max_chars: int = Field(default=1000, ge=1, le=CHUNK_CHARS_MAX)
    overlap_chars: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _valid(self) -> ChunkingConfig:
        self.to_domain()  # raises ValueError with the rule broken
        return self

    def to_domain(self) -> ChunkingSettings:
        return ChunkingSettings(self.max_chars, self.overlap_chars)


class SyncConfig(_Frozen):
    # Events applied per ledger transaction and per bulk write: big enough to amortize round
    # trips to both stores, small enough that a crash re-drives little.
    batch_events: int = Field(default=500, ge=1, le=10_000)


class RebuildSettings(_Frozen):
    """``lockstep rebuild`` and ``lockstep gc``: blue-green generations."""

    # A swapped-out generation is kept (and kept in step) this long for rollbacks, then
    # ``lockstep gc`` drops it.
    retention_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    # Documents copied into the new generation per two-phase batch; the resume point is saved
    # after each batch, so a crash re-does at most one batch.
    batch_docs: int = Field(default=200, ge=1, le=10_000)
    # A file with one query per line, run against both generations before the swap.
    queries_path: str | None = None
    # Hits per query compared between the generations.
    queries_k: int = Field(default=10, ge=1, le=1000)


class RunSettings(_Frozen):
    """``lockstep run``: the long-running service on Ray."""

    # Join an existing Ray cluster at this address; empty starts a local one in this process.
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(default=None, ge=1)
    # This replica's name in shard leases (defaults to the host name; on Kubernetes the pod
    # name). Two live processes must never share it: a restart of the same replica takes its
    # shards over at once, fencing its previous incarnation.
    replica: str | None = Field(default=None, pattern=r"^[^#]+$")
    shards: int = Field(default=2, ge=1, le=256)
    # Custom Ray resources each shard actor requires, e.g. ``{"lockstep_shard": 1}``: shard
    # actors go only to nodes started with them (``ray start --resources``) and hold them, not a
    # CPU, while they live. Empty: Ray places shard actors where it likes. The two index writers
    # stay on the driver's node (with a ``ray://`` client, the head) when it can host them.
    shard_resources: dict[str, float] = Field(default_factory=dict)
    # A shard actor lost with its node is re-created at once on a node that offers
    # ``shard_resources`` (a new lease epoch fences the lost one); if no node takes it within
    # this long, the service stops (exit 1; /readyz says why) rather than wait unseen.
    shard_replace_timeout_s: float = Field(default=300.0, gt=0)
    # A shard owner must renew its lease within this time or another replica may take over.
    lease_s: float = Field(default=30.0, gt=1.0)
    # Distinct documents waiting per shard before the reader is pushed back.
    mailbox_docs_max: int = Field(default=2000, ge=1)
    # Documents a shard prepares and applies together in one step.
    batch_docs_max: int = Field(default=200, ge=1)
    # Full batches a shard prepares (plans, embeds, records intents for) while its current one
    # is written to the indexes, so that CPU work overlaps the wait on the stores (0: none).
    prepare_ahead: int = Field(default=2, ge=0, le=16)
    # Envelopes the reader sends to one shard per Ray call.
    offer_batch_max: int = Field(default=500, ge=1)
    # How long shutdown waits for in-flight work to commit before giving up.
    grace_s: float = Field(default=30.0, ge=0)
    # Snapshot sources (folder, SQL table) are polled this often.
    poll_interval_s: float = Field(default=5.0, gt=0)
    # Sources that can find rows gone without a trace (a SQL table's hard deletes) are asked
    # for those deletes after a poll at most this often (0 turns it off): each pass reads every
    # live ledger document and looks its row up.
    reconcile_interval_s: float = Field(default=300.0, ge=0)
    # Continuous audit: every this many seconds, probe what changed plus a random sample and
    # publish drift gauges (0 turns it off).
    audit_interval_s: float = Field(default=60.0, ge=0)
    audit_sample_docs: int = Field(default=200, ge=0, le=100_000)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=9464, ge=0, le=65535)

    @field_validator("shard_resources")
    @classmethod
    def _custom_resources(cls, resources: dict[str, float]) -> dict[str, float]:
        """Only custom resources, each a positive amount: Ray takes CPUs, GPUs and memory as
        options of their own, and refuses them in this map."""
        builtin = sorted(set(resources) & RAY_BUILTIN_RESOURCES)
        if builtin:
            raise ValueError(f"shard_resources takes custom resources only, not {', '.join(builtin)}")
        if any(amount <= 0 for amount in resources.values()):
            raise ValueError("every amount in shard_resources must be positive")
        return resources


class SearchSettings(_Frozen):
    """Searches: ``lockstep search``, ``POST /search`` (``lockstep run`` and ``lockstep serve``)
    and the Python API (docs/search.md)."""

    # Hits each leg asks its engine for: the same window on both engines.
    window: int = Field(default=search_domain.WINDOW_DEFAULT, ge=1, le=search_domain.WINDOW_MAX)
    # The reciprocal rank fusion constant and the weight of each leg.
    rrf_k: int = Field(default=RRF_K_DEFAULT, ge=1, le=100_000)
    keyword_weight: float = Field(default=1.0, ge=0, le=1000)
    vector_weight: float = Field(default=1.0, ge=0, le=1000)
    # One leg's engine call (the query's embedding included) is given up after this long.
    leg_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # How long a search with a consistency token waits for its changes before answering 504.
    consistency_wait_s: float = Field(
        default=search_domain.CONSISTENCY_WAIT_S_DEFAULT, gt=0, le=search_domain.CONSISTENCY_WAIT_S_MAX
    )
    # When set, ``POST /search`` requires ``Authorization: Bearer <token>``
    # (``LOCKSTEP_SEARCH__TOKEN``); at least as long as the webhook's.
    token: SecretStr | None = None

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < webhook.TOKEN_CHARS_MIN:
            raise ValueError(f"the search token must have at least {webhook.TOKEN_CHARS_MIN} characters")
        return token

    def to_domain(self) -> search_domain.SearchParams:
        return search_domain.SearchParams(
            window=self.window,
            rrf_k=self.rrf_k,
            keyword_weight=self.keyword_weight,
            vector_weight=self.vector_weight,
            leg_timeout_s=self.leg_timeout_s,
            consistency_wait_s=self.consistency_wait_s,
        )


def _default_keyword() -> KeywordSettings:
    return KeywordSettings(kind="tantivy", path=DEFAULT_TANTIVY_PATH)


def _default_vector() -> VectorSettings:
    return VectorSettings(uri=DEFAULT_MILVUS_URI)


class Settings(BaseSettings):
    """Everything lockstep needs to run, validated at start-up."""

    # hide_input_in_errors: a refused value may be a secret (a token, a password, a DSN), so
    # validation errors name the key and the rule, never the value.
    model_config = SettingsConfigDict(
        env_prefix="LOCKSTEP_", env_nested_delimiter="__", frozen=True, extra="forbid",
        hide_input_in_errors=True,
    )

    source: SourceSettings | None = None
    keyword: KeywordSettings = Field(default_factory=_default_keyword)
    vector: VectorSettings = Field(default_factory=_default_vector)
    ledger: AnyLedgerSettings = LedgerSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    chunking: ChunkingConfig = ChunkingConfig()
    sync: SyncConfig = SyncConfig()
    run: RunSettings = RunSettings()
    rebuild: RebuildSettings = RebuildSettings()
    search: SearchSettings = SearchSettings()

    def model_post_init(self, context: Any, /) -> None:
        # Every process that holds settings redacts their secrets from what it logs or stores.
        register_secrets(self.secrets())

    def __setstate__(self, state: dict[Any, Any]) -> None:
        # A Ray actor receives its settings pickled, which skips model_post_init.
        super().__setstate__(state)
        register_secrets(self.secrets())

    def secrets(self) -> list[str]:
        """Every configured secret value, and the password inside any secret URL or DSN."""
        found: list[str] = []
        _collect_secrets(self, found)
        return found

    @field_validator("keyword", mode="before")
    @classmethod
    def _tantivy_path_default(cls, value: Any) -> Any:
        """A Tantivy index the config gives no ``path`` lives where the embedded default's does."""
        if isinstance(value, dict) and value.get("kind", "tantivy") == "tantivy" and not value.get("url"):
            return {"path": DEFAULT_TANTIVY_PATH, **value}
        return value

    @field_validator("vector", mode="before")
    @classmethod
    def _milvus_uri_default(cls, value: Any) -> Any:
        """A vector section without ``uri`` uses the embedded default's milvus-lite file."""
        return {"uri": DEFAULT_MILVUS_URI, **value} if isinstance(value, dict) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init values; the environment overrides it.
        return env_settings, init_settings


def load_settings(path: str | Path | None) -> Settings:
    """Read a YAML config (or none: the embedded defaults) and apply environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a YAML mapping")
    where = path or "(LOCKSTEP_* variables)"
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {where}: {_one_line(exc)}") from exc
    except ValueError as exc:  # pydantic-settings: an environment value it cannot parse
        raise ConfigError(f"invalid config {where}: {' '.join(str(exc).split())}") from exc


def require_serving_token(settings: Settings) -> None:
    """``lockstep run`` serves ``POST /events`` for a webhook source, so it needs the token."""
    if isinstance(settings.source, WebhookSourceSettings) and settings.source.token_value is None:
        raise ConfigError(TOKEN_REQUIRED)


def _one_line(exc: ValidationError) -> str:
    """Every refused key and its rule on one line; never the value (it may be a secret)."""
    return "; ".join(
        f"{'.'.join(map(str, error['loc'])) or 'config'}: {error['msg'].removeprefix('Value error, ')}"
        for error in exc.errors(include_url=False, include_input=False)
    )


# ``user:password@`` inside a URL or a libpq URI.
_URL_PASSWORD = re.compile(r"://[^/\s:@]*:(?P<password>[^/\s@]+)@")
# ``password=...`` in a libpq key=value string.
_DSN_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*(?P<password>'[^']*'|\S+)")


def _collect_secrets(model: BaseModel, found: list[str]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            secret = value.get_secret_value()
            found.append(secret)
            found.extend(m["password"].strip("'") for m in _URL_PASSWORD.finditer(secret))
            found.extend(m["password"].strip("'") for m in _DSN_PASSWORD.finditer(secret))
        elif isinstance(value, BaseModel):
            _collect_secrets(value, found)

"""The container packaging and the Helm chart in helm/lockstep, proved without a cluster.

The real Helm CLI (shipped in a PyPI wheel, see tests/support/helm_cli.py) runs
``helm lint --strict`` and ``helm template`` for every values case; the rendered manifests are
then checked against Kubernetes' schemas, the "restricted" Pod Security Standard, lockstep's own
settings class and a running ``lockstep run``.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError

from lockstep.metrics import Metrics
from lockstep.settings import Settings, SourceSettings, load_settings
from tests.support import helm_cli

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "lockstep"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
RELEASE, NAMESPACE = "lockstep", "search"
# The Kubernetes release the chart is rendered for and the manifests are validated against (the
# chart needs >= 1.27).
K8S_VERSION = "1.31"
# Helm processes run at once while the cases are linted and rendered: each is short and mostly
# start-up, so a few overlap well on two cores without crowding them.
HELM_PROCESSES_MAX = 4
# `lockstep run` starts Ray and its shard actors before /readyz turns 200.
READY_TIMEOUT_S = 180
POD_NAME = f"{RELEASE}-0"
# A webhook token stand-in: lockstep refuses one shorter than 16 characters.
WEBHOOK_TOKEN = "stand-in-webhook-token-0123456789"


# --- helm, once per session ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _secrets(**refs: str) -> dict[str, dict[str, str]]:
    return {key: {"name": name, "key": "value"} for key, name in refs.items()}


# Value sets that together reference every Secret the chart knows, so every secret-backed variable
# is rendered at least once. Some exclude each other: basic auth and an API key, and each source
# kind's own credential (lockstep refuses a source key its kind does not have).
ALL_SECRETS_A = {
    "config": {"keyword": {"username": "lockstep"},
               "embedder": {"kind": "openai", "base_url": "http://tei/v1", "model": "m", "dim": 384}},
    "secrets": _secrets(keywordPassword="kw", vectorToken="milvus", ledgerDsn="pg", embedderApiKey="emb",
                        sourceUrl="src", searchToken="search"),
    "search": {"enabled": True},
}
KAFKA_SOURCE = {"kind": "kafka", "name": "cdc", "bootstrap_servers": ["k:9093"], "topics": ["pg.public.articles"],
                "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "lockstep",
                "tables": {"public.articles": {"doc_id": "article:{id}", "text_columns": ["title", "body"]}}}
ALL_SECRETS_B = {
    "config": {"source": KAFKA_SOURCE, "vector": {"user": "lockstep"}},
    "secrets": _secrets(keywordApiKey="kw", vectorPassword="milvus", ledgerDsn="pg", sourceUrl="",
                        sourceSaslPassword="kafka"),
}
SOURCE_POSTGRES_LOGICAL = {
    "config": {"source": {"kind": "postgres_logical", "name": "app", "tables": ["public.articles"]}},
    "secrets": _secrets(ledgerDsn="pg", sourceUrl="", sourceDsn="app-db"),
}
SECRET_CASES = ("secrets-a", "secrets-b", "source-postgres-logical", "source-webhook")
EVERYTHING_ON = {
    "ray": {"mode": "kuberay"},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True, "egress": [{"to": [{"podSelector": {}}]}]},
    "rebuild": {"enabled": True, "extraArgs": ["--chunking", "max_chars=500"]},
    "search": {"enabled": True, "autoscaling": {"enabled": True}},
}
# Value sets the chart must refuse: one the schema rejects (lint and install both notice), and
# some that pass the schema but that lockstep cannot run (the templates `fail`, which lint
# ignores), each with the message the render must give.
BROKEN_SCHEMA = {"replicaCount": "two", "config": {"keyword": {"password": "hunter2"}}}
BROKEN_COMBINATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "broken-combination": (
        {"replicaCount": 2, "config": {"ledger": {"kind": "sqlite"}}, "secrets": _secrets(ledgerDsn="")},
        "replicaCount > 1 needs config.ledger.kind=postgres"),
    "broken-logical-without-dsn": (
        {"config": SOURCE_POSTGRES_LOGICAL["config"], "secrets": _secrets(sourceUrl="")},
        "config.source.kind=postgres_logical needs secrets.sourceDsn.name"),
    "broken-webhook-without-token": (
        {"config": {"source": {"kind": "webhook"}}, "secrets": _secrets(sourceUrl="")},
        "config.source.kind=webhook needs secrets.sourceToken.name"),
    "broken-token-on-sql-source": (
        {"secrets": _secrets(sourceToken="hook")},
        "secrets.sourceToken is set but config.source.kind is not webhook"),
    "broken-kafka-sasl-without-password": (
        {"config": {"source": KAFKA_SOURCE}, "secrets": _secrets(sourceUrl="")},
        "config.source.kind=kafka needs secrets.sourceSaslPassword.name"),
    "broken-kafka-sasl-without-user": (
        {"config": {"source": {k: v for k, v in KAFKA_SOURCE.items() if k != "sasl_username"}},
         "secrets": _secrets(sourceUrl="", sourceSaslPassword="kafka")},
        "config.source.security_protocol=SASL_SSL needs config.source.sasl_username"),
    "broken-search-autoscaling": (
        {"search": {"enabled": True, "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "search.autoscaling.minReplicas must not exceed search.autoscaling.maxReplicas"),
    "broken-logical-tables-unprefixed": (
        {"config": {"source": {"kind": "postgres_logical", "tables": ["public.a", "public.b"]}},
         "secrets": _secrets(sourceUrl="", sourceDsn="app-db")},
        "set config.source.table_prefix_ids=true"),
}


@pytest.fixture(scope="session")
def probe_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def webhook_port() -> int:
    return _free_port()


@dataclass(frozen=True)
class Case:
    """One values case through real Helm: its lint report, and the objects `helm template`
    rendered (``docs``) or the message it refused them with (``error``)."""

    lint: helm_cli.Lint
    docs: list[dict[str, Any]] | None
    error: str | None


def _lint_and_render(values_file: Path, set_values: dict[str, str]) -> Case:
    """`helm lint --strict` and `helm template` of the chart with one values file."""
    report = helm_cli.lint(CHART, [values_file], kube_version=K8S_VERSION)
    try:
        docs = helm_cli.template(RELEASE, CHART, [values_file], set_values, namespace=NAMESPACE,
                                 kube_version=K8S_VERSION)
    except helm_cli.HelmError as exc:
        return Case(lint=report, docs=None, error=exc.output)
    return Case(lint=report, docs=docs, error=None)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory, probe_port: int, webhook_port: int) -> dict[str, Case]:
    """Lint and render every case once: defaults, each example file as it is, and the special
    sets above (each written to a values file); the probe port arrives through ``--set``."""
    source_webhook = {"config": {"source": {"kind": "webhook", "name": "hooks"}, "run": {"http_port": webhook_port}},
                      "secrets": _secrets(sourceUrl="", sourceToken="hook"), "serviceMonitor": {"enabled": True}}
    cases: dict[str, Any] = {"default": {}, "secrets-a": ALL_SECRETS_A, "secrets-b": ALL_SECRETS_B,
                             "source-postgres-logical": SOURCE_POSTGRES_LOGICAL, "source-webhook": source_webhook,
                             "everything": EVERYTHING_ON, "broken-schema": BROKEN_SCHEMA, "probe-port": {}}
    cases |= {case: values for case, (values, _message) in BROKEN_COMBINATIONS.items()}
    work = tmp_path_factory.mktemp("helm")
    files = {case: work / f"{case}.yaml" for case in cases}
    for case, values in cases.items():
        files[case].write_text(yaml.safe_dump(values))
    files |= {f"example:{path.name}": path for path in EXAMPLES}
    set_values = {"probe-port": {"config.run.http_port": str(probe_port)}}
    with ThreadPoolExecutor(HELM_PROCESSES_MAX) as pool:
        done = {case: pool.submit(_lint_and_render, path, set_values.get(case, {})) for case, path in files.items()}
        return {case: future.result() for case, future in done.items()}


def _docs(helm: dict[str, Case], case: str) -> list[dict[str, Any]]:
    rendered = helm[case]
    assert rendered.docs is not None, f"{case}: {rendered.error}"
    # A copy per call, so that no test can change what the next one reads.
    return copy.deepcopy(rendered.docs)


def _good_cases(helm: dict[str, Case]) -> list[str]:
    return [case for case in helm if not case.startswith("broken-")]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_one(docs, "ConfigMap", RELEASE)["data"]["lockstep.yaml"])
    return config


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = _one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    return container


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template inside a manifest, named ``Kind/name[/group]``."""
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = doc.get("spec", {})
    if doc["kind"] in ("StatefulSet", "Deployment", "Job", "DaemonSet"):
        yield where, spec["template"]
    elif doc["kind"] == "CronJob":
        yield where, spec["jobTemplate"]["spec"]["template"]
    elif doc["kind"] == "RayCluster":
        yield f"{where}/head", spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield f"{where}/{group['groupName']}", group["template"]


# --- (1) lint --------------------------------------------------------------------------------


def test_chart_lints_clean_and_renders_with_real_helm(helm: dict[str, Case]) -> None:
    """Helm lints the chart with no warning or error for the defaults, every example and every
    feature switched on, renders each of them, and refuses a value set lockstep cannot run."""
    assert {f"example:{path.name}" for path in EXAMPLES} <= set(helm), "an example was not linted"
    for case in _good_cases(helm):
        lint = helm[case].lint
        assert lint.passed, f"{case}: helm lint --strict failed:\n{lint.output}"
        assert not lint.findings("ERROR"), f"{case}: helm lint errors {lint.output}"
        assert not lint.findings("WARNING"), f"{case}: lint warnings {lint.output}"
        assert _docs(helm, case), case
    broken_lint = helm["broken-schema"].lint
    assert not broken_lint.passed and broken_lint.findings("ERROR"), "lint accepted values the schema forbids"
    schema_error = helm["broken-schema"].error
    assert schema_error is not None and helm["broken-schema"].docs is None, "values the schema forbids rendered"
    assert "/replicaCount" in schema_error and "password" in schema_error, schema_error
    for case, (_values, message) in BROKEN_COMBINATIONS.items():
        assert helm[case].docs is None, f"{case} rendered"
        assert message in (helm[case].error or ""), (case, helm[case].error)


# --- (2) values schema -----------------------------------------------------------------------


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_values_and_every_example_validate_against_the_schema() -> None:
    """values.yaml and each file in helm/lockstep/examples satisfy values.schema.json."""
    validator = jsonschema.Draft202012Validator(_schema())
    assert EXAMPLES, "no example values files"
    for path in [CHART / "values.yaml", *EXAMPLES]:
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors}"


def _schema_nodes(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, child in node.get("properties", {}).items():
        yield f"{path}.{key}", child
        yield from _schema_nodes(child, f"{path}.{key}")


def test_schema_types_and_describes_every_value() -> None:
    """Every property in values.schema.json has a type and a description, and every key of
    values.yaml is declared there (objects refuse unknown keys)."""
    schema = _schema()
    for path, node in _schema_nodes(schema, "values"):
        assert node.get("type"), f"{path} has no type"
        assert node.get("description"), f"{path} has no description"
    for path, node in [("values", schema), *_schema_nodes(schema, "values")]:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts undeclared keys"


def _documented_paths(node: dict[str, Any], path: str = "") -> Iterator[str]:
    """Value paths the README's table must list: leaves, with Secret refs, resources and probe
    timings as one row each."""
    collapsed = path.startswith("secrets.") or path.rsplit(".", 1)[-1] in ("resources", "liveness", "readiness")
    if "properties" not in node or collapsed:
        yield path
        return
    for key, child in node["properties"].items():
        if key != "global":
            yield from _documented_paths(child, f"{path}.{key}".lstrip("."))


def test_readme_values_table_lists_every_value() -> None:
    """helm/lockstep/README.md has a row for every value the schema declares."""
    readme = (CHART / "README.md").read_text()
    missing = [p for p in _documented_paths(_schema()) if f"| `{p}` |" not in readme]
    assert not missing, missing


def _secret_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str]]:
    """(env var, config path) of every SecretStr field below ``model``, unions included."""
    for name, field in model.model_fields.items():
        key = field.alias or name
        env = f"{prefix}__{key.upper()}"
        annotation = repr(field.annotation)
        if "SecretStr" in annotation:
            yield env, key
        for sub in _models_in(field.annotation):
            yield from _secret_fields(sub, env)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _settings_secret_env() -> dict[str, tuple[str, str]]:
    """LOCKSTEP_<SECTION>__<KEY> -> (section, key) for every secret setting lockstep has."""
    out: dict[str, tuple[str, str]] = {}
    for section, field in Settings.model_fields.items():
        for model in _models_in(field.annotation):
            for env, key in _secret_fields(model, f"LOCKSTEP_{section.upper()}"):
                out[env] = (section, key)
    return out


def test_schema_refuses_credentials_in_the_config_section() -> None:
    """Putting any secret setting (password, token, API key, DSN, SQL URL) under `config` fails
    schema validation, so a credential can never be rendered into the ConfigMap."""
    validator = jsonschema.Draft202012Validator(_schema())
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    secret_env = _settings_secret_env()
    assert {("source", "url"), ("source", "dsn"), ("source", "token"), ("source", "sasl_password")} <= set(secret_env.values())
    for section, key in sorted(set(secret_env.values())):
        values = json.loads(json.dumps(base))
        values["config"].setdefault(section, {})[key] = "hunter2"
        assert not validator.is_valid(values), f"config.{section}.{key} was accepted by the schema"
    for name in sorted(secret_env):
        values = json.loads(json.dumps(base))
        values["extraEnv"] = [{"name": name, "value": "hunter2"}]
        assert not validator.is_valid(values), f"{name} was accepted as a plain extraEnv value"


def _source_models() -> dict[str, type[BaseModel]]:
    """Each source kind of lockstep's settings -> its settings class."""
    return {m.model_fields["kind"].default: m for m in _models_in(Settings.model_fields["source"].annotation)}


def _plain_keys(model: type[BaseModel]) -> set[str]:
    """The config keys of a settings class that are not secrets (those come from Secrets)."""
    return {f.alias or n for n, f in model.model_fields.items() if "SecretStr" not in repr(f.annotation)}


def _chart_kind_keys() -> dict[str, dict[str, list[str]]]:
    """The keys the chart keeps per kind of a section (the ``lockstep.kindKeys`` template)."""
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    body = text.split('{{- define "lockstep.kindKeys" -}}', 1)[1].split("{{- end }}", 1)[0]
    kind_keys: dict[str, dict[str, list[str]]] = yaml.safe_load(body)
    return kind_keys


def test_chart_knows_every_source_kind_and_setting_lockstep_has() -> None:
    """For each source kind lockstep has, the schema offers the kind and declares each of its
    non-secret settings, and the chart keeps exactly those keys in the ConfigMap: none silently
    dropped, none of another kind left for lockstep to refuse."""
    models = _source_models()
    assert {"sql", "folder", "jsonl", "kafka", "postgres_logical", "webhook"} <= set(models)
    source_schema = _schema()["properties"]["config"]["properties"]["source"]
    assert set(source_schema["properties"]["kind"]["enum"]) == set(models)
    assert set(source_schema["properties"]) == set().union(*(_plain_keys(m) for m in models.values()))
    kind_keys = _chart_kind_keys()["source"]
    assert set(kind_keys) == set(models)
    for kind, model in models.items():
        assert set(kind_keys[kind]) == _plain_keys(model), kind


# Source sections the schema and lockstep's settings must both accept (True) or both refuse.
_KAFKA_TABLE = {"doc_id": "article:{id}", "text_columns": ["body"]}
_KAFKA = {"kind": "kafka", "bootstrap_servers": ["k:9093"], "topics": ["t"], "tables": {"public.a": _KAFKA_TABLE}}
SOURCE_SAMPLES = [
    pytest.param(_KAFKA, True, id="kafka"),
    pytest.param(KAFKA_SOURCE, True, id="kafka-sasl"),
    pytest.param(_KAFKA | {"tables": ["public.a"]}, False, id="kafka-tables-as-list"),
    pytest.param(_KAFKA | {"tables": {}}, False, id="kafka-no-table"),
    pytest.param(_KAFKA | {"tables": {"public.a": {"text_columns": ["body"]}}}, False, id="kafka-no-doc-id"),
    pytest.param(_KAFKA | {"tables": {"public.a": _KAFKA_TABLE | {"text_template": "{title}"}}}, False,
                 id="kafka-two-texts"),
    pytest.param(_KAFKA | {"tables": {"public.a": {"doc_id": "article:{id}"}}}, False, id="kafka-no-text"),
    pytest.param(_KAFKA | {"tables": {"public.a": {"doc_id": "article", "text_columns": ["body"]}}}, False,
                 id="kafka-doc-id-without-column"),
    pytest.param({k: v for k, v in _KAFKA.items() if k != "topics"}, False, id="kafka-no-topics"),
    pytest.param(_KAFKA | {"bootstrap_servers": ["user:pw@k:9093"]}, False, id="kafka-credentials-in-servers"),
    pytest.param(_KAFKA | {"security_protocol": "SASL_PLAIN"}, False, id="kafka-unknown-protocol"),
    pytest.param({"kind": "postgres_logical", "tables": ["public.a", "public.b"], "table_prefix_ids": True}, True,
                 id="postgres-logical"),
    pytest.param({"kind": "postgres_logical", "tables": {"public.a": _KAFKA_TABLE}}, False,
                 id="postgres-logical-tables-as-mapping"),
    pytest.param({"kind": "postgres_logical", "tables": []}, False, id="postgres-logical-no-table"),
    pytest.param({"kind": "postgres_logical", "tables": ["public.a"], "slot": "Lockstep-Slot"}, False,
                 id="postgres-logical-bad-slot"),
    pytest.param({"kind": "postgres_logical"}, False, id="postgres-logical-no-tables"),
    pytest.param({"kind": "webhook", "name": "hooks", "batch_events_max": 1000, "retention_s": 3600}, True,
                 id="webhook"),
    pytest.param({"kind": "webhook", "batch_events_max": 0}, False, id="webhook-no-events"),
    pytest.param({"kind": "webhook", "body_bytes_max": 100}, False, id="webhook-tiny-body"),
    pytest.param({"kind": "sql", "table": "documents"}, True, id="sql"),
    pytest.param({"kind": "sql"}, False, id="sql-no-table"),
    pytest.param({"kind": "jsonl"}, False, id="jsonl-no-path"),
    pytest.param({"kind": "kafka-debezium", "bootstrap_servers": ["k:9093"], "topics": ["t"]}, False,
                 id="the-old-guessed-kind"),
]
# The credential of each kind, which reaches lockstep from a Secret rather than the config.
SOURCE_SECRET_STAND_INS = {"sql": {"url": "sqlite:///x.db"}, "postgres_logical": {"dsn": "postgresql://db/app"},
                           "webhook": {"token": WEBHOOK_TOKEN}, "kafka": {"sasl_password": "pw"}}


@pytest.mark.parametrize(("source", "valid"), SOURCE_SAMPLES)
def test_schema_agrees_with_lockstep_on_source_sections(source: dict[str, Any], valid: bool) -> None:
    """A source section passes values.schema.json exactly when lockstep's settings accept it
    (with its credential from a Secret), so a mistake fails at `helm install`, not in a crash loop."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["config"]["source"] = source
    errors = [e.message for e in jsonschema.Draft202012Validator(_schema()).iter_errors(values)]
    try:
        TypeAdapter(SourceSettings).validate_python(source | SOURCE_SECRET_STAND_INS.get(source["kind"], {}))
        loaded = True
    except ValidationError:
        loaded = False
    assert loaded is valid, f"lockstep {'refused' if valid else 'accepted'} {source}"
    assert (not errors) is valid, f"the schema {'refused' if valid else 'accepted'} {source}: {errors}"


# --- (3) Kubernetes schemas ------------------------------------------------------------------


def test_rendered_manifests_validate_against_kubernetes_schemas(helm: dict[str, Case]) -> None:
    """Every built-in object the chart renders, in every case, is valid Kubernetes (strict: no
    unknown fields); the custom resources are the two CRDs the chart documents."""
    custom = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
    checked = 0
    for case in _good_cases(helm):
        for doc in _docs(helm, case):
            if (doc["apiVersion"], doc["kind"]) in custom:
                continue
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{case}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}") from exc
            checked += 1
    assert checked > 50


# --- (4) secrets -----------------------------------------------------------------------------


def _lockstep_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "RayCluster":
            continue  # Ray pods run `ray start`, not lockstep: settings reach the actors through Ray.
        for where, template in _pod_templates(doc):
            for container in template["spec"]["containers"]:
                yield where, container


def test_every_secret_backed_setting_is_read_from_a_secret(helm: dict[str, Case]) -> None:
    """Each SecretStr setting of lockstep, of every source kind included, reaches every lockstep
    container through a secretKeyRef, never as a plain value; the chart reads no Secret into a
    variable lockstep does not have; no credential key appears in any rendered ConfigMap; and
    the chart creates no Secret itself."""
    expected = set(_settings_secret_env())
    assert {"LOCKSTEP_KEYWORD__PASSWORD", "LOCKSTEP_KEYWORD__API_KEY", "LOCKSTEP_VECTOR__TOKEN",
            "LOCKSTEP_VECTOR__PASSWORD", "LOCKSTEP_LEDGER__DSN", "LOCKSTEP_EMBEDDER__API_KEY", "LOCKSTEP_SOURCE__URL",
            "LOCKSTEP_SOURCE__DSN", "LOCKSTEP_SOURCE__SASL_PASSWORD", "LOCKSTEP_SOURCE__TOKEN",
            "LOCKSTEP_SEARCH__TOKEN"} <= expected
    seen: set[str] = set()
    for case in SECRET_CASES:
        docs = _docs(helm, case)
        containers = list(_lockstep_containers(docs))
        assert {where.split("/")[0] for where, _ in containers} >= {"StatefulSet", "CronJob"}
        for where, container in containers:
            env = {e["name"]: e for e in container["env"]}
            from_secrets = {n for n, e in env.items() if "secretKeyRef" in e.get("valueFrom", {})}
            assert from_secrets <= expected, f"{case} {where}: lockstep has no {sorted(from_secrets - expected)}"
            names = {n for n in env if n in expected}
            seen |= names
            for name in names:
                assert "value" not in env[name], f"{case} {where}: {name} has a plain value"
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] and ref["key"], f"{case} {where}: {name}"
    assert seen == expected, f"never rendered from a Secret: {sorted(expected - seen)}"
    secret_paths = set(_settings_secret_env().values())
    for case in _good_cases(helm):
        docs = _docs(helm, case)
        assert not [d for d in docs if d["kind"] == "Secret"], f"{case}: the chart must not create Secrets"
        config = _config(docs)
        leaked = [f"{section}.{key}" for section, key in secret_paths if key in (config.get(section) or {})]
        assert not leaked, f"{case}: the ConfigMap holds {leaked}"


# --- (5) restricted Pod Security Standard ----------------------------------------------------


def _assert_restricted(where: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
    assert pod.get("runAsUser", 1) != 0, f"{where}: runs as root"
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: pod seccompProfile"
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(flag), f"{where}: {flag}"
    assert not [v for v in spec.get("volumes", []) if "hostPath" in v], f"{where}: hostPath volume"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec["containers"] + spec.get("initContainers", []):
        name = f"{where}/{container['name']}"
        sc = container.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"
        assert not sc.get("capabilities", {}).get("add"), f"{name}: adds capabilities"
        assert sc.get("runAsNonRoot") is True and sc.get("privileged") is not True, f"{name}: root/privileged"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccompProfile"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        for path in ("/tmp", "/dev/shm"):
            assert "emptyDir" in volumes.get(mounts.get(path, ""), {}), f"{name}: {path} is not an emptyDir"


def test_every_pod_template_meets_the_restricted_pod_security_standard(helm: dict[str, Case]) -> None:
    """The StatefulSet, the search Deployment, the audit CronJob, the rebuild Job and the
    RayCluster's head and workers all run non-root, without privilege escalation or capabilities,
    with RuntimeDefault seccomp and a read-only root filesystem whose writable paths are emptyDirs."""
    kinds: set[str] = set()
    for case in _good_cases(helm):
        for doc in _docs(helm, case):
            for where, template in _pod_templates(doc):
                kinds.add(doc["kind"])
                _assert_restricted(f"{case}: {where}", template)
    assert kinds == {"StatefulSet", "Deployment", "CronJob", "Job", "RayCluster"}


# --- (6) probes against a running service ----------------------------------------------------


def _local_config(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The chart's config with the stores swapped for embedded ones under ``tmp_path``."""
    (tmp_path / "events.jsonl").write_text("")
    return config | {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"kind": "sqlite", "path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing", "dim": 384},
    }


def _get(url: str) -> httpx.Response:
    try:
        return httpx.get(url, timeout=5.0)
    except httpx.TransportError:
        return httpx.Response(599)


def test_probes_point_at_endpoints_the_service_serves(helm: dict[str, Case], tmp_path: Path, probe_port: int) -> None:
    """`lockstep run` started with the ConfigMap's config (stores made local) listens where the
    StatefulSet's probes point and answers 200 on both probe paths once ready."""
    docs = _docs(helm, "probe-port")
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert {p["path"] for p in probes.values()} == {"/healthz", "/readyz"}
    config = _local_config(_config(docs), tmp_path)
    assert config["run"]["http_host"] == "0.0.0.0" and config["run"]["http_port"] == probe_port
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_")} | {"LOCKSTEP_RUN__REPLICA": POD_NAME}
    proc = subprocess.Popen([sys.executable, "-m", "lockstep", *container["args"][:2], "run", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        urls = {kind: f"http://127.0.0.1:{ports[p['port']]}{p['path']}" for kind, p in probes.items()}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(urls["readinessProbe"]).status_code != 200:
            assert proc.poll() is None, "lockstep run exited before turning ready"
            assert time.monotonic() < deadline, "lockstep run never turned ready"
            time.sleep(0.5)
        assert _get(urls["livenessProbe"]).status_code == 200
        assert _get(f"http://127.0.0.1:{ports['http']}/metrics").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]


def _applied_events(metrics_url: str) -> float:
    """The service's ``lockstep_events_total{outcome="applied"}``, 0 until it has one."""
    for line in _get(metrics_url).text.splitlines():
        if line.startswith('lockstep_events_total{outcome="applied"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(_matches(e, labels) for e in selector.get("matchExpressions", []))


def _matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
    outcomes = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}
    return outcomes[operator]


def test_service_monitor_scrapes_each_pod_once(helm: dict[str, Case]) -> None:
    """The ServiceMonitor selects only the main Service, not the headless or the webhook Service
    that reach the same pods, so Prometheus scrapes every pod once."""
    docs = _docs(helm, "source-webhook")
    services = [d for d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {RELEASE, f"{RELEASE}-headless", f"{RELEASE}-webhook"}
    selector = _one(docs, "ServiceMonitor")["spec"]["selector"]
    assert [s["metadata"]["name"] for s in services if _selects(selector, s["metadata"]["labels"])] == [RELEASE]


def test_webhook_posts_reach_the_service_through_its_service(
    helm: dict[str, Case], tmp_path: Path, webhook_port: int
) -> None:
    """With `kind: webhook` the chart renders a ClusterIP Service `<fullname>-webhook` that keeps
    routing to unready pods; `lockstep run` started with the rendered config (stores made local)
    and the token from the Secret's variable takes POST /events on the port that Service targets:
    202 and applied with the token, 401 without it."""
    docs = _docs(helm, "source-webhook")
    service = _one(docs, "Service", f"{RELEASE}-webhook")["spec"]
    pod_labels = _one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert service["type"] == "ClusterIP" and service["publishNotReadyAddresses"] is True
    assert service["selector"].items() <= pod_labels.items()
    assert _one(docs, "Service", RELEASE)["spec"]["ports"] == service["ports"]
    container = _container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = [ports[p["targetPort"]] for p in service["ports"]]
    assert port == webhook_port
    rendered = _config(docs)
    config = _local_config(rendered, tmp_path) | {"source": rendered["source"]}
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    token = _pod_env(container)["LOCKSTEP_SOURCE__TOKEN"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_")}
    env |= {"LOCKSTEP_RUN__REPLICA": POD_NAME, "LOCKSTEP_SOURCE__TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "lockstep", *container["args"][:2], "run", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    event = {"op": "upsert", "doc_id": "kb-1", "version": 1, "text": "Refunds take 5 days.", "metadata": {}}
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(f"{base}/readyz").status_code != 200:
            assert proc.poll() is None, "lockstep run exited before turning ready"
            assert time.monotonic() < deadline, "lockstep run never turned ready"
            time.sleep(0.5)
        refused = httpx.post(f"{base}/events", json=event, headers={"Authorization": "Bearer not-the-token-at-all"},
                             timeout=10.0)
        assert refused.status_code == 401, refused.text
        accepted = httpx.post(f"{base}/events", json=event, headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
        assert accepted.status_code == 202, accepted.text
        while _applied_events(f"{base}/metrics") < 1:
            assert proc.poll() is None, "lockstep run exited before applying the event"
            assert time.monotonic() < deadline, "the posted event was never applied"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]


# --- (7) the rendered config loads with lockstep's settings ----------------------------------


def _pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The LOCKSTEP_* environment the pod would get, with a stand-in value per Secret."""
    stand_ins = {"LOCKSTEP_LEDGER__DSN": "postgresql://lockstep:pw@postgres:5432/lockstep",
                 "LOCKSTEP_SOURCE__URL": "postgresql+psycopg://reader:pw@postgres/catalog",
                 "LOCKSTEP_SOURCE__DSN": "postgresql://replicator:pw@postgres:5432/app",
                 "LOCKSTEP_SOURCE__TOKEN": WEBHOOK_TOKEN, "LOCKSTEP_SEARCH__TOKEN": "stand-in-search-token-0123456789"}
    env: dict[str, str] = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[var["name"]] = stand_ins.get(var["name"], f"secret-{source['secretKeyRef']['name']}")
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[var["name"]] = POD_NAME
        else:
            env[var["name"]] = var["value"]
    return {k: v for k, v in env.items() if k.startswith("LOCKSTEP_")}


@pytest.mark.parametrize("case", ["default", "everything", *SECRET_CASES, *[f"example:{p.name}" for p in EXAMPLES]])
def test_rendered_config_loads_with_lockstep_settings(
    helm: dict[str, Case], case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap's YAML plus the pod's environment loads with `load_settings`, source
    included: the secrets land in their settings, the replica is the pod name and the HTTP port
    is the container's. An example's source section reaches the ConfigMap whole."""
    docs = _docs(helm, case)
    container = _container(docs)
    config, env = _config(docs), _pod_env(container)
    if case.startswith("example:"):
        example = yaml.safe_load((CHART / "examples" / case.removeprefix("example:")).read_text())
        assert config["source"] == example["config"]["source"]
    for name in [k for k in os.environ if k.startswith("LOCKSTEP_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    assert settings.source is not None and settings.source.kind == config["source"]["kind"]
    assert settings.run.replica == POD_NAME
    assert settings.run.http_host == "0.0.0.0"
    assert settings.run.http_port == container["ports"][0]["containerPort"]
    for name, value in env.items():
        section, key = name.removeprefix("LOCKSTEP_").lower().split("__")
        loaded = getattr(getattr(settings, section), key)
        assert (loaded.get_secret_value() if isinstance(loaded, SecretStr) else loaded) == value, name
    if "RayCluster" in {d["kind"] for d in docs}:
        assert settings.run.ray_address == f"ray://{RELEASE}-ray-head-svc.{NAMESPACE}.svc:10001"


# --- the rest of the chart -------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + suffix for family in Metrics().registry.collect() for suffix in suffixes[family.type]}


def test_dashboard_queries_only_metrics_lockstep_exports(helm: dict[str, Case]) -> None:
    """Every lockstep_* series the Grafana dashboard queries is exported by `lockstep run`, and the
    dashboard covers the freshness lag, event outcomes, drift and the DLQ size."""
    import re

    dashboard = json.loads(_one(_docs(helm, "default"), "ConfigMap", f"{RELEASE}-dashboard")["data"]["lockstep.json"])
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    used = set(re.findall(r"\blockstep_[a-z_]+", exprs))
    assert used <= _exported_metric_names(), sorted(used - _exported_metric_names())
    for needed in ("lockstep_freshness_lag_seconds_bucket", "lockstep_events_total", "lockstep_dead_letters",
                   "lockstep_drift_chunks", 'outcome=~"received|applied|stale|coalesced'):
        assert needed in exprs, needed


def _by_component(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} of component {component}, found {len(found)}"
    return found[0]


def _run_locally(args: list[str], config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The rendered container arguments, run here with the mounted config swapped for ``config``."""
    local_args = [str(config) if a == "/etc/lockstep/lockstep.yaml" else a for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_")}
    return subprocess.run([sys.executable, "-m", "lockstep", *local_args], capture_output=True, text=True,
                          env=env, timeout=READY_TIMEOUT_S, check=False, cwd=tmp_path)


def test_audit_and_gc_cronjobs_and_the_rebuild_job_run_their_real_commands(helm: dict[str, Case], tmp_path: Path) -> None:
    """The audit CronJob runs `lockstep audit -c <mounted config> --json` once per schedule with no
    retry, so exit 1 (drift) fails the Job; the gc CronJob runs `lockstep gc`; the rebuild Job
    renders only when enabled. Each one's exact arguments run clean against local stores."""
    docs = _docs(helm, "default")
    cron = _by_component(docs, "CronJob", "audit")
    job = cron["spec"]["jobTemplate"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("audit"):] == ["audit", "-c", "/etc/lockstep/lockstep.yaml", "--json"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/etc/lockstep"}
    assert not [d for d in docs if d["kind"] == "Job"]
    config = tmp_path / "lockstep.yaml"
    config.write_text(yaml.safe_dump(_local_config(_config(docs), tmp_path)))
    audit = _run_locally(args, config, tmp_path)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    assert json.loads(audit.stdout)["clean"] is True

    gc_args = _by_component(docs, "CronJob", "gc")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert gc_args[gc_args.index("gc"):] == ["gc", "-c", "/etc/lockstep/lockstep.yaml"]
    gc = _run_locally(gc_args, config, tmp_path)
    assert gc.returncode == 0 and json.loads(gc.stdout) == {"dropped": []}, gc.stderr[-2000:]

    rebuild = _one(_docs(helm, "everything"), "Job")
    rebuild_args = rebuild["spec"]["template"]["spec"]["containers"][0]["args"]
    assert rebuild_args[rebuild_args.index("rebuild"):] == [
        "rebuild", "-c", "/etc/lockstep/lockstep.yaml", "--chunking", "max_chars=500"]
    rebuilt = _run_locally(rebuild_args, config, tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert json.loads(rebuilt.stdout)["swap"]["generation"] == 2


# --- the package and its entrypoint ----------------------------------------------------------


def test_wheel_installs_into_a_fresh_venv_and_the_entrypoint_runs(tmp_path: Path) -> None:
    """`pip wheel .` builds lockstep, the wheel installs into a fresh venv, and the installed
    `lockstep` console script (not the editable checkout) answers --help and runs the demo."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(wheels)],
                   cwd=ROOT, check=True, timeout=300)
    (wheel,) = wheels.glob("lockstep-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # Without PYTHONPATH: pointing at a checkout, it shows pip the lockstep.egg-info that
    # `pip wheel .` left there as an installed lockstep, and pip would skip the install.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300, env=env)
    # The dependencies come from this test's environment, appended after the venv's own
    # site-packages; a .pth line adds the directory without running the editable finder in it.
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import lockstep; print(lockstep.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout
    assert where.startswith(venv_site), where
    help_text = subprocess.run([str(venv / "bin" / "lockstep"), "--help"], capture_output=True, text=True,
                               check=True, cwd=tmp_path, env=env, timeout=120).stdout
    for command in ("run", "sync", "status", "demo"):
        assert command in help_text
    demo = subprocess.run([str(venv / "bin" / "lockstep"), "demo", "--docs", "20", "--embedder", "hashing",
                           "--data-dir", str(tmp_path / "demo")], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300, check=False)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]


# --- the search replicas ---------------------------------------------------------------------


def test_search_replicas_run_lockstep_serve_apart_from_the_statefulset(helm: dict[str, Case], tmp_path: Path) -> None:
    """With search enabled the chart renders a Deployment running `lockstep serve` whose pods no
    selector of the StatefulSet picks (and whose Service, PDB and HPA pick only them), without
    the source's credentials; its exact arguments, run here against local stores, answer the
    probe paths and POST /search."""
    docs = _docs(helm, "everything")
    deployment = _one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    statefulset = _one(docs, "StatefulSet")
    assert not _selects(statefulset["spec"]["selector"], pod_labels)
    for service in [d for d in docs if d["kind"] == "Service"]:
        picks = service["spec"]["selector"].items() <= pod_labels.items()
        assert picks == (service["metadata"]["name"] == f"{RELEASE}-search"), service["metadata"]["name"]
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert _selects(pdbs[f"{RELEASE}-search"]["spec"]["selector"], pod_labels)
    assert not _selects(pdbs[RELEASE]["spec"]["selector"], pod_labels)
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-search"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert "replicas" in _one(_docs(helm, "secrets-a"), "Deployment")["spec"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][2:] == ["serve", "-c", "/etc/lockstep/lockstep.yaml"]
    secret_env = {e["name"] for e in _one(_docs(helm, "secrets-a"), "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"] if "valueFrom" in e}
    assert "LOCKSTEP_SEARCH__TOKEN" in secret_env and not {n for n in secret_env if n.startswith("LOCKSTEP_SOURCE__")}
    _serve_locally(container, _config(docs), tmp_path)


def _serve_locally(container: dict[str, Any], rendered: dict[str, Any], tmp_path: Path) -> None:
    port = _free_port()
    config = _local_config(rendered, tmp_path)
    config["run"] = {k: v for k, v in config["run"].items() if k != "ray_address"} | {"http_port": port}
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "events.jsonl").write_text(json.dumps({"op": "upsert", "doc_id": "kb-1", "version": 1,
                                                       "text": "Refunds take 5 days."}) + "\n")
    synced = _run_locally(["sync", "-c", "/etc/lockstep/lockstep.yaml"], path, tmp_path)
    assert synced.returncode == 0, synced.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSTEP_")}
    args = [str(path) if a == "/etc/lockstep/lockstep.yaml" else a for a in container["args"]]
    proc = subprocess.Popen([sys.executable, "-m", "lockstep", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        probes = {kind: container[kind]["httpGet"]["path"] for kind in ("livenessProbe", "readinessProbe")}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(base + probes["readinessProbe"]).status_code != 200:
            assert proc.poll() is None, "lockstep serve exited before turning ready"
            assert time.monotonic() < deadline, "lockstep serve never turned ready"
            time.sleep(0.5)
        assert _get(base + probes["livenessProbe"]).status_code == 200
        found = httpx.post(f"{base}/search", json={"query": "refunds"}, timeout=30.0)
        assert found.status_code == 200 and [h["doc_id"] for h in found.json()["hits"]] == ["kb-1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=READY_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]

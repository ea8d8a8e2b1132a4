{{/* Names and labels. */}}
{{- define "lockstep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lockstep.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lockstep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lockstep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The search pods' own name label, so that no selector of the StatefulSet's (its Services, its PDB, the ServiceMonitor) ever picks them. */}}
{{- define "lockstep.searchSelectorLabels" -}}
app.kubernetes.io/name: {{ include "lockstep.name" . }}-search
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: search
{{- end }}

{{- define "lockstep.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "lockstep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lockstep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lockstep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lockstep.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "lockstep.configPath" -}}/etc/lockstep/lockstep.yaml{{- end }}

{{- define "lockstep.httpPort" -}}
{{- (.Values.config.run | default dict).http_port | default 9464 }}
{{- end }}

{{/* The Ray client address of the RayCluster's head service (KubeRay names it <cluster>-head-svc). */}}
{{- define "lockstep.rayAddress" -}}
{{- printf "ray://%s-ray-head-svc.%s.svc:10001" (include "lockstep.fullname" .) .Release.Namespace }}
{{- end }}

{{/*
Keys each kind of a polymorphic section accepts. Helm deep-merges a user's values over the
chart's, so `config.source: {kind: jsonl, path: ...}` would otherwise inherit the default SQL
source's `table` and friends, which lockstep refuses; keys of other kinds are dropped instead.
*/}}
{{- define "lockstep.kindKeys" -}}
source:
  jsonl: [kind, name, path]
  folder: [kind, name, path, patterns]
  sql: [kind, name, table, id_column, text_column, metadata_column, metadata_columns, updated_at_column, deleted_at_column, version_column]
  kafka: [kind, name, bootstrap_servers, topics, group_id, client_id, tables, version_field, security_protocol, sasl_mechanism, sasl_username, ssl_cafile, auto_offset_reset, isolation_level, session_timeout_s, request_timeout_s, revoke_grace_s, assignment_wait_s]
  postgres_logical: [kind, name, tables, slot, publication, id_column, text_column, metadata_column, metadata_columns, table_prefix_ids, poll_interval_s, peek_changes_max, txn_buffer_changes_max, connect_timeout_s, statement_timeout_s, outage_max_s]
  webhook: [kind, name, body_bytes_max, batch_events_max, backlog_events_max, retention_s, inbox_path]
keyword:
  tantivy: [kind, index, path]
  opensearch: [kind, index, url, username, ca_certs, verify_certs, request_timeout_s]
  elasticsearch: [kind, index, url, username, ca_certs, verify_certs, request_timeout_s]
ledger:
  sqlite: [kind, path]
  postgres: [kind, schema, connect_timeout_s, statement_timeout_s]
{{- end }}

{{/* The YAML config: values.config with each section cut to its kind's keys, plus the Ray address in kuberay mode. Never a secret. */}}
{{- define "lockstep.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $defaultKinds := dict "source" "" "keyword" "tantivy" "ledger" "sqlite" }}
{{- range $section, $kinds := include "lockstep.kindKeys" . | fromYaml }}
{{- $body := get $config $section }}
{{- if $body }}
{{- $keep := get $kinds ($body.kind | default (get $defaultKinds $section)) | default list }}
{{- $cut := dict }}
{{- range $key := $keep }}
{{- if hasKey $body $key }}
{{- $_ := set $cut $key (get $body $key) }}
{{- end }}
{{- end }}
{{- $_ := set $config $section $cut }}
{{- end }}
{{- end }}
{{- if eq .Values.ray.mode "kuberay" }}
{{- $run := deepCopy ($config.run | default dict) }}
{{- $_ := set $run "ray_address" (include "lockstep.rayAddress" .) }}
{{- $_ := set $config "run" $run }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Secret-backed settings: values.secrets key -> the LOCKSTEP_<SECTION>__<KEY> variable lockstep's
settings read. tests/test_helm.py checks this list against every SecretStr field of the settings.
*/}}
{{- define "lockstep.secretEnvNames" -}}
keywordPassword: LOCKSTEP_KEYWORD__PASSWORD
keywordApiKey: LOCKSTEP_KEYWORD__API_KEY
vectorToken: LOCKSTEP_VECTOR__TOKEN
vectorPassword: LOCKSTEP_VECTOR__PASSWORD
ledgerDsn: LOCKSTEP_LEDGER__DSN
embedderApiKey: LOCKSTEP_EMBEDDER__API_KEY
sourceUrl: LOCKSTEP_SOURCE__URL
sourceDsn: LOCKSTEP_SOURCE__DSN
sourceSaslPassword: LOCKSTEP_SOURCE__SASL_PASSWORD
sourceToken: LOCKSTEP_SOURCE__TOKEN
searchToken: LOCKSTEP_SEARCH__TOKEN
{{- end }}

{{/*
The source kind each source Secret belongs to. lockstep refuses a source key its kind does not
have, so each of these is required by (or only allowed with) its kind.
*/}}
{{- define "lockstep.sourceSecretKinds" -}}
sourceUrl: sql
sourceDsn: postgres_logical
sourceSaslPassword: kafka
sourceToken: webhook
{{- end }}

{{/* Environment of every lockstep container: credentials from Secrets, then extraEnv. With
"searchOnly", the source's credentials are left out (a search pod reads no source). */}}
{{- define "lockstep.env" -}}
{{- $root := . }}
{{- $searchOnly := false }}
{{- if hasKey . "root" }}
{{- $root = .root }}
{{- $searchOnly = .searchOnly }}
{{- end }}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/huggingface
{{- $names := include "lockstep.secretEnvNames" $root | fromYaml }}
{{- range $key := keys $names | sortAlpha }}
{{- $ref := get $root.Values.secrets $key }}
{{- if and $ref.name (not (and $searchOnly (hasPrefix "source" $key))) }}
- name: {{ get $names $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name | quote }}
      key: {{ $ref.key | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The "restricted" Pod Security Standard, at pod level ... */}}
{{- define "lockstep.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* ... and at container level; the root filesystem is read-only, /tmp and /dev/shm are emptyDirs. */}}
{{- define "lockstep.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "lockstep.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSizeLimit }}
{{- end }}

{{- define "lockstep.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* Volumes and mounts of a container that runs a lockstep command. */}}
{{- define "lockstep.volumes" -}}
- name: config
  configMap:
    name: {{ include "lockstep.fullname" . }}
{{ include "lockstep.scratchVolumes" . }}
{{- end }}

{{- define "lockstep.volumeMounts" -}}
- name: config
  mountPath: /etc/lockstep
  readOnly: true
{{ include "lockstep.scratchMounts" . }}
{{- if .Values.persistence.enabled }}
- name: data
  mountPath: /var/lib/lockstep
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every lockstep pod template. */}}
{{- define "lockstep.podSpecCommon" -}}
serviceAccountName: {{ include "lockstep.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- include "lockstep.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Refuse value combinations lockstep cannot run with, at render time rather than in a crash loop. */}}
{{- define "lockstep.validate" -}}
{{- $c := .Values.config }}
{{- $ledger := $c.ledger | default dict }}
{{- $keyword := $c.keyword | default dict }}
{{- $vector := $c.vector | default dict }}
{{- $postgres := eq ($ledger.kind | default "sqlite") "postgres" }}
{{- $embedded := or (not $postgres) (eq ($keyword.kind | default "tantivy") "tantivy") (hasSuffix ".db" ($vector.uri | default ".db")) }}
{{- if and $postgres (not .Values.secrets.ledgerDsn.name) }}
{{- fail "config.ledger.kind=postgres needs secrets.ledgerDsn.name (a Secret holding the DSN)" }}
{{- end }}
{{- if and .Values.secrets.ledgerDsn.name (not $postgres) }}
{{- fail "secrets.ledgerDsn is set but config.ledger.kind is not postgres: lockstep would refuse the DSN" }}
{{- end }}
{{- include "lockstep.validateSource" . }}
{{- if ne (not $keyword.username) (not .Values.secrets.keywordPassword.name) }}
{{- fail "config.keyword.username and secrets.keywordPassword go together (basic auth needs both)" }}
{{- end }}
{{- if and $keyword.username .Values.secrets.keywordApiKey.name }}
{{- fail "set either config.keyword.username (basic auth) or secrets.keywordApiKey, not both" }}
{{- end }}
{{- if ne (not $vector.user) (not .Values.secrets.vectorPassword.name) }}
{{- fail "config.vector.user and secrets.vectorPassword go together" }}
{{- end }}
{{- if and $vector.user .Values.secrets.vectorToken.name }}
{{- fail "set either secrets.vectorToken or config.vector.user with secrets.vectorPassword, not both" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (not $postgres) }}
{{- fail "replicaCount > 1 needs config.ledger.kind=postgres: replicas share shard leases through it" }}
{{- end }}
{{- if and $embedded (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount > 1 needs server stores: an embedded Tantivy index, milvus-lite file or SQLite ledger has one writer" }}
{{- end }}
{{- if and $embedded (not .Values.persistence.enabled) }}
{{- fail "embedded stores (Tantivy, a milvus-lite .db file or the SQLite ledger) need persistence.enabled=true and paths under /var/lib/lockstep" }}
{{- end }}
{{- if and $embedded (eq .Values.ray.mode "kuberay") }}
{{- fail "ray.mode=kuberay needs server stores and the postgres ledger: actors on other pods cannot open this pod's files" }}
{{- end }}
{{- end }}

{{/* The source section against its Secrets: each source Secret with its own kind only. */}}
{{- define "lockstep.validateSource" -}}
{{- $source := .Values.config.source | default dict }}
{{- $kind := $source.kind | default "" }}
{{- $sasl := hasPrefix "SASL" ($source.security_protocol | default "") }}
{{- range $key, $owner := include "lockstep.sourceSecretKinds" . | fromYaml }}
{{- $set := (get $.Values.secrets $key).name }}
{{- if and $set (ne $kind $owner) }}
{{- fail (printf "secrets.%s is set but config.source.kind is not %s: lockstep would refuse it" $key $owner) }}
{{- end }}
{{- if and (eq $kind $owner) (not $set) (or (ne $owner "kafka") $sasl) }}
{{- fail (printf "config.source.kind=%s needs secrets.%s.name (an existing Secret holding it)" $kind $key) }}
{{- end }}
{{- end }}
{{- if and (eq $kind "kafka") $sasl (not $source.sasl_username) }}
{{- fail (printf "config.source.security_protocol=%s needs config.source.sasl_username" $source.security_protocol) }}
{{- end }}
{{- if and (eq $kind "postgres_logical") (gt (len ($source.tables | default list)) 1) (not $source.table_prefix_ids) }}
{{- fail "config.source.tables lists several tables: set config.source.table_prefix_ids=true (doc_id becomes <table>/<id>)" }}
{{- end }}
{{- end }}

{{/* The chart name, overridable. */}}
{{- define "batchd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every resource name. */}}
{{- define "batchd.fullname" -}}
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

{{/* Labels of every resource. */}}
{{- define "batchd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "batchd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select batchd's pods. */}}
{{- define "batchd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "batchd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "batchd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "batchd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret and key holding the database URL. */}}
{{- define "batchd.databaseSecretName" -}}
{{- default (printf "%s-database" (include "batchd.fullname" .)) .Values.database.existingSecret }}
{{- end }}
{{- define "batchd.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}database-url{{ end }}
{{- end }}

{{/* Whether the database is the embedded SQLite. */}}
{{- define "batchd.sqlite" -}}
{{- if and (not .Values.database.existingSecret) (hasPrefix "sqlite:" .Values.database.url) }}true{{ end }}
{{- end }}

{{/* Refuses combinations that cannot work, with a message that says why. */}}
{{- define "batchd.validate" -}}
{{- if include "batchd.sqlite" . }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "database.url is SQLite, which only one process can use, but replicaCount is %d: use PostgreSQL (database.url=postgres://... or database.existingSecret) or set replicaCount=1" (int .Values.replicaCount)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "database.url is SQLite, which only one process can use, but autoscaling.enabled would run several replicas: use PostgreSQL or disable autoscaling" }}
{{- end }}
{{- end }}
{{- if and (not .Values.database.existingSecret) (not .Values.database.url) }}
{{- fail "no database: set database.url (postgres://USER:PASSWORD@HOST:5432/DB) or database.existingSecret" }}
{{- end }}
{{- if and .Values.tenants.rateLimitBurst (not .Values.tenants.rateLimitPerKey) }}
{{- fail (printf "tenants.rateLimitBurst is %d but tenants.rateLimitPerKey is 0 (no rate limit): set a rate too, or leave the burst at 0" (int64 .Values.tenants.rateLimitBurst)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail (printf "autoscaling.maxReplicas (%d) is below autoscaling.minReplicas (%d)" (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- end }}
{{- end }}

{{/* The replicas the pods can run as: a PDB makes sense only above one. */}}
{{- define "batchd.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/* Names: Kubernetes names are at most 63 characters; the suffixes below fit in what is left. */}}
{{- define "longctx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "longctx.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "longctx.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: selectorLabels never change over a release's life (selectors are immutable). */}}
{{- define "longctx.selectorLabels" -}}
app.kubernetes.io/name: {{ include "longctx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "longctx.labels" -}}
helm.sh/chart: {{ include "longctx.chart" . }}
{{ include "longctx.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* (dict "context" $ "component" "redis") -> selector labels of one component */}}
{{- define "longctx.componentSelector" -}}
{{ include "longctx.selectorLabels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "longctx.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Derived sizes */}}
{{- define "longctx.worldSize" -}}
{{- mul .Values.parallel.tensorParallelSize .Values.parallel.sequenceParallelSize -}}
{{- end -}}

{{/* Worker pods for (dict "context" $ "replicas" N): a replica spans nodesPerReplica pods. */}}
{{- define "longctx.workerPods" -}}
{{- mul .replicas .context.Values.workers.nodesPerReplica -}}
{{- end -}}

{{/* Redis */}}
{{- define "longctx.redisEnabled" -}}
{{- if and (ne .Values.redis.mode "none") (gt (int64 .Values.kvTiers.hostBytes) 0) -}}true{{- end -}}
{{- end -}}

{{- define "longctx.redisName" -}}
{{- printf "%s-redis" (include "longctx.fullname" .) -}}
{{- end -}}

{{- define "longctx.redisPasswordSecret" -}}
{{- default (printf "%s-redis-password" (include "longctx.fullname" .)) .Values.redis.password.existingSecret -}}
{{- end -}}

{{- define "longctx.redisPasswordMounted" -}}
{{- if or (eq .Values.redis.mode "internal") .Values.redis.password.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "longctx.redisTlsMounted" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* Where the Ray pods find the secrets they read (files, so that no secret is in the RayService). */}}
{{- define "longctx.redisPasswordFile" -}}/etc/longctx/redis-password/{{ .Values.redis.password.key }}{{- end -}}
{{- define "longctx.redisCaFile" -}}/etc/longctx/redis-tls/ca.crt{{- end -}}
{{- define "longctx.apiKeyFile" -}}/etc/longctx/api-key/{{ .Values.serve.apiKey.key }}{{- end -}}

{{- define "longctx.redisUrls" -}}
{{- if eq .Values.redis.mode "external" -}}
{{- toJson .Values.redis.urls -}}
{{- else if .Values.redis.tls.enabled -}}
{{- list (printf "rediss://%s:6379/0?ssl_ca_certs=%s" (include "longctx.redisName" .) (include "longctx.redisCaFile" .)) | toJson -}}
{{- else -}}
{{- list (printf "redis://%s:6379/0" (include "longctx.redisName" .)) | toJson -}}
{{- end -}}
{{- end -}}

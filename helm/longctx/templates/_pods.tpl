{{/* Pieces of the Ray pod templates. */}}

{{- define "longctx.rayContainer" -}}
image: {{ include "longctx.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/* Volumes of a GPU worker pod: the model, /dev/shm, and the secrets longctx reads as files. */}}
{{- define "longctx.workerVolumes" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.objectStore.sizeLimit }}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.workers.shmSize }}
- name: tmp
  emptyDir: {}
{{- if and (include "longctx.redisEnabled" .) (include "longctx.redisPasswordMounted" .) }}
- name: redis-password
  secret:
    secretName: {{ include "longctx.redisPasswordSecret" . }}
    items:
      - key: {{ .Values.redis.password.key }}
        path: {{ .Values.redis.password.key }}
{{- end }}
{{- if and (include "longctx.redisEnabled" .) (include "longctx.redisTlsMounted" .) }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.existingSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .Values.serve.apiKey.existingSecret }}
- name: api-key
  secret:
    secretName: {{ .Values.serve.apiKey.existingSecret }}
    items:
      - key: {{ .Values.serve.apiKey.key }}
        path: {{ .Values.serve.apiKey.key }}
{{- end }}
{{- end -}}

{{- define "longctx.workerVolumeMounts" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  {{- if eq .Values.model.source "pvc" }}
  readOnly: true
  {{- with .Values.model.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
  {{- end }}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if and (include "longctx.redisEnabled" .) (include "longctx.redisPasswordMounted" .) }}
- name: redis-password
  mountPath: {{ dir (include "longctx.redisPasswordFile" .) }}
  readOnly: true
{{- end }}
{{- if and (include "longctx.redisEnabled" .) (include "longctx.redisTlsMounted" .) }}
- name: redis-tls
  mountPath: {{ dir (include "longctx.redisCaFile" .) }}
  readOnly: true
{{- end }}
{{- if .Values.serve.apiKey.existingSecret }}
- name: api-key
  mountPath: {{ dir (include "longctx.apiKeyFile" .) }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The init container copying the model from an object store (model.source: objectStore). */}}
{{- define "longctx.modelCopyContainer" -}}
- name: copy-model
  image: {{ .Values.model.objectStore.image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.model.objectStore.command }}
  command:
    {{- toYaml .Values.model.objectStore.command | nindent 4 }}
  {{- else }}
  command: ["aws", "s3", "sync", "--only-show-errors", "$(MODEL_URI)", "$(MODEL_DIR)"]
  {{- end }}
  env:
    - name: MODEL_URI
      value: {{ required "model.objectStore.uri is required when model.source is objectStore" .Values.model.objectStore.uri | quote }}
    - name: MODEL_DIR
      value: {{ .Values.model.mountPath | quote }}
    - name: HOME
      value: /tmp
  {{- with .Values.model.objectStore.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{- define "longctx.podScheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The longctx config (cluster/config.py's keys) from the values, then extraConfig merged over it.
The device is cuda, not auto: the Serve controller builds the application on the head, which has
no GPU, and must still give every rank a GPU bundle.
*/}}
{{- define "longctx.config" -}}
{{- $v := .Values -}}
{{- $model := dict "path" $v.model.mountPath "dtype" $v.model.dtype "device" "cuda" "max_model_len" $v.model.maxModelLen -}}
{{- $cache := dict "block_size" $v.cache.blockSize "device_memory_fraction" $v.cache.deviceMemoryFraction "enable_prefix_caching" $v.cache.enablePrefixCaching -}}
{{- $scheduler := dict "max_num_seqs" $v.scheduler.maxNumSeqs "max_tokens_per_step" $v.scheduler.maxTokensPerStep "max_waiting_requests" $v.scheduler.maxWaitingRequests -}}
{{/* ray, not auto: the ranks are Ray actors in the replica's placement group, whatever process builds the app */}}
{{- $parallel := dict "tensor_parallel_size" $v.parallel.tensorParallelSize "sequence_parallel_size" $v.parallel.sequenceParallelSize "executor" "ray" -}}
{{- if gt (int $v.workers.nodesPerReplica) 1 -}}
{{/* each TP group stays on one node, SP ranks cross nodes (executors/placement.py) */}}
{{- $_ := set $parallel "span_nodes" true -}}
{{- end -}}
{{- $scaling := $v.serve.autoscaling -}}
{{/* Autoscaled: the most replicas there may be. Under Serve's policies the application sizes its
ingress and resource check for this count and the override below makes it `auto`; the
queued-context policy ignores it (its config section carries the bounds). */}}
{{- $replicas := ternary $scaling.maxReplicas $v.serve.numReplicas $scaling.enabled -}}
{{- $serve := dict "model_name" $v.model.name "num_replicas" $replicas "ingress_replicas" $v.serve.ingressReplicas "ingress_num_cpus" $v.serve.ingressNumCpus "worker_num_cpus" $v.serve.workerNumCpus "max_queued_requests" $v.serve.maxQueuedRequests "max_queued_tokens" $v.serve.maxQueuedTokens "request_timeout_s" $v.serve.requestTimeoutS "max_request_body_bytes" $v.serve.maxRequestBodyBytes "drain_timeout_s" $v.serve.drainTimeoutS "routing_block_tokens" $v.router.blockTokens "routing_max_tracked_blocks" $v.router.maxTrackedBlocks "routing_stats_period_s" $v.router.statsPeriodS "routing_long_prompt_tokens" $v.router.longPromptTokens "routing_short_lanes" $v.router.shortLanes -}}
{{- if $v.workers.acceleratorType -}}
{{- $_ := set $serve "accelerator_type" $v.workers.acceleratorType -}}
{{- end -}}
{{- if $v.serve.apiKey.existingSecret -}}
{{- $_ := set $serve "api_key_file" (include "longctx.apiKeyFile" .) -}}
{{- end -}}
{{- $tiers := dict "host_bytes" $v.kvTiers.hostBytes "restore_policy" $v.kvTiers.restorePolicy "redis_ttl_s" $v.kvTiers.redisTtlS "redis_write_through" $v.kvTiers.redisWriteThrough "redis_key_prefix" $v.kvTiers.redisKeyPrefix -}}
{{- if include "longctx.redisEnabled" . -}}
{{- $_ := set $tiers "redis_urls" (include "longctx.redisUrls" . | fromJsonArray) -}}
{{- if include "longctx.redisPasswordMounted" . -}}
{{- $_ := set $tiers "redis_password_file" (include "longctx.redisPasswordFile" .) -}}
{{- end -}}
{{- end -}}
{{- $config := dict "model" $model "cache" $cache "scheduler" $scheduler "parallel" $parallel "serve" $serve "kv_tiers" $tiers -}}
{{- if include "longctx.queuedContextScaling" . -}}
{{- $knobs := $scaling.queuedContext -}}
{{- $_ := set $config "autoscaling" (dict "enabled" true "min_replicas" $scaling.minReplicas "max_replicas" $scaling.maxReplicas "ttft_target_s" $knobs.ttftTargetS "spare_replicas" $knobs.spareReplicas "replica_startup_s" $knobs.replicaStartupS "downscale_delay_s" $knobs.downscaleDelayS) -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $config (deepCopy $v.extraConfig)) -}}
{{- end -}}

{{/* "true" when the queued-context policy sizes the replicas, else empty. */}}
{{- define "longctx.queuedContextScaling" -}}
{{- if and .Values.serve.autoscaling.enabled (eq .Values.serve.autoscaling.policy "queuedContext") -}}true{{- end -}}
{{- end -}}

{{/*
Serve's option overrides of the LLM server deployment: autoscaling by one of Serve's policies.
The queued-context policy needs none (deployments/app.py builds its autoscaling_config from the
config's autoscaling section) and must get none: an override's autoscaling_config replaces the
code's, policy included (Serve fills the keys it leaves out with its own defaults).
*/}}
{{- define "longctx.llmServerOverrides" -}}
{{- $scaling := .Values.serve.autoscaling -}}
{{- $overrides := dict "name" "LLMServer" -}}
{{- if and $scaling.enabled (not (include "longctx.queuedContextScaling" .)) -}}
{{- $serveSettings := $scaling.ongoingRequests -}}
{{- $autoscalingConfig := dict "min_replicas" $scaling.minReplicas "max_replicas" $scaling.maxReplicas "target_ongoing_requests" $serveSettings.targetOngoingRequests "upscale_delay_s" $serveSettings.upscaleDelayS "downscale_delay_s" $serveSettings.downscaleDelayS -}}
{{- if ne $scaling.policy "ongoingRequests" -}}
{{- $_ := set $autoscalingConfig "policy" (dict "policy_function" $scaling.policy) -}}
{{- end -}}
{{- $_ := set $overrides "num_replicas" "auto" -}}
{{- $_ := set $overrides "autoscaling_config" $autoscalingConfig -}}
{{- end -}}
{{- if gt (len $overrides) 1 -}}
{{- list $overrides | toYaml -}}
{{- end -}}
{{- end -}}

{{/* KubeRay's serveConfigV2: Ray Serve's deploy schema, as deployments/serve_config.yaml. */}}
{{- define "longctx.serveConfig" -}}
{{- $application := dict "name" "longctx" "route_prefix" "/" "import_path" "deployments.app:build_app" "args" (dict "config" (include "longctx.config" . | fromYaml) "overrides" (dict)) -}}
{{- $deployments := include "longctx.llmServerOverrides" . | fromYamlArray -}}
{{- if $deployments -}}
{{- $_ := set $application "deployments" $deployments -}}
{{- end -}}
{{- $http := dict "host" "0.0.0.0" "port" 8000 "request_timeout_s" nil -}}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $application)) -}}
{{- end -}}

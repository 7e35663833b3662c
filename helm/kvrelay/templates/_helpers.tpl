{{/*
Names. KubeRay appends up to 16 characters to a RayService's name (cluster suffix,
"-serve-svc"), so it refuses names over 47 characters: everything here is cut to 47.
*/}}
{{- define "kvrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" }}
{{- end }}

{{- define "kvrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that select this release's Ray pods. Not app.kubernetes.io/name: KubeRay sets
that to "kuberay" on every Ray pod, and a template label would override it.
*/}}
{{- define "kvrelay.podSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: kvrelay
{{- end }}

{{- define "kvrelay.labels" -}}
helm.sh/chart: {{ include "kvrelay.chart" . }}
{{ include "kvrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvrelay
{{- end }}

{{- define "kvrelay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Ray custom resources: each worker group's pods advertise one unit of their group's
resource, and kvrelay asks one unit per worker actor (pools.*_resources), so a prefill
actor lands only on a prefill pod, one per pod. The head advertises kvrelay_router; the
router replica asks a sliver of it, which pins it to the head (where the API key env
is) while still letting Serve start a second replica during an update.
*/}}
{{- define "kvrelay.rayResource" -}}
{{- printf "kvrelay_%s" . }}
{{- end }}

{{/* rayStartParams "resources" value: a JSON object inside a quoted string, the format
KubeRay passes through to `ray start --resources`. */}}
{{- define "kvrelay.rayStartResources" -}}
{{- printf "\"{\\\"%s\\\": 1}\"" (include "kvrelay.rayResource" .) }}
{{- end }}

{{- define "kvrelay.colocated" -}}
{{- if (.Values.config.pools).colocated }}true{{ end }}
{{- end }}

{{/* API key Secret: an existing one, or the chart's own when apiKey.value is set. */}}
{{- define "kvrelay.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "kvrelay.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kvrelay.apiKeySecretKey" -}}
{{- default "api-key" .Values.apiKey.existingSecretKey }}
{{- end }}

{{/* Block-hash key Secret: an existing one, or the chart's own when hashSeed.generate is set. */}}
{{- define "kvrelay.hashSeedSecretName" -}}
{{- if .Values.hashSeed.existingSecret }}
{{- .Values.hashSeed.existingSecret }}
{{- else if .Values.hashSeed.generate }}
{{- printf "%s-hash-seed" (include "kvrelay.fullname" .) }}
{{- end }}
{{- end }}

{{- define "kvrelay.hashSeedSecretKey" -}}
{{- default "hash-seed" .Values.hashSeed.existingSecretKey }}
{{- end }}

{{/* engine.model as the workers and the router see it inside their pods. */}}
{{- define "kvrelay.engineModel" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "image" }}
{{- $m.path }}
{{- else if $m.path }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) $m.path }}
{{- else }}
{{- $m.mountPath }}
{{- end }}
{{- end }}

{{/*
The CPUs KubeRay advertises to Ray for a container (its `ray start --num-cpus`): the CPU
limit, else the request, rounded up to a whole CPU. Empty when neither is set.
*/}}
{{- define "kvrelay.rayCpus" -}}
{{- $r := default (dict) . }}
{{- $cpu := (default (dict) $r.limits).cpu | default (default (dict) $r.requests).cpu }}
{{- if $cpu }}
{{- $q := toString $cpu }}
{{- if hasSuffix "m" $q }}
{{- ceil (divf (float64 (trimSuffix "m" $q)) 1000) }}
{{- else }}
{{- ceil (float64 $q) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
What values.schema.json cannot express. Every message names the value to change.
*/}}
{{- define "kvrelay.validate" -}}
{{- $v := .Values }}
{{- $colocated := include "kvrelay.colocated" . }}
{{- $fullname := include "kvrelay.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) }}
{{- fail (printf "the RayService name %q must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter): change the release name or set fullnameOverride" $fullname) }}
{{- end }}
{{- $roles := list "decode" }}
{{- if not $colocated }}{{ $roles = list "prefill" "decode" }}{{ end }}
{{- range $role := $roles }}
{{- $g := index $v $role }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%d) must not exceed %s.maxReplicas (%d)" $role (int $g.minReplicas) $role (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s.replicas (%d) must lie within %s.minReplicas (%d) and %s.maxReplicas (%d): kvrelay starts exactly %s.replicas worker actors (pools.%s_workers)" $role (int $g.replicas) $role (int $g.minReplicas) $role (int $g.maxReplicas) $role $role) }}
{{- end }}
{{- $rayCpus := index (default (dict) $g.rayStartParams) "num-cpus" | default (include "kvrelay.rayCpus" $g.resources) }}
{{- $perWorker := float64 (default 1 ($v.config.pools).cpus_per_worker) }}
{{- if and $rayCpus (lt (float64 $rayCpus) $perWorker) }}
{{- fail (printf "%s pods offer Ray %s CPU(s) (%s.rayStartParams num-cpus, else its resources), less than config.pools.cpus_per_worker (%v): the %s worker could never be placed" $role $rayCpus $role $perWorker $role) }}
{{- end }}
{{- range $kind := list "limits" "requests" }}
{{- if hasKey (default (dict) (index (default (dict) $g.resources) $kind)) "nvidia.com/gpu" }}
{{- fail (printf "%s.resources.%s sets nvidia.com/gpu: set %s.gpus instead (it also sets kvrelay's pools.gpus_per_worker)" $role $kind $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $colocated }}
{{- if lt (int $v.prefill.replicas) 1 }}
{{- fail "prefill.replicas must be at least 1 unless config.pools.colocated is true" }}
{{- end }}
{{- if ne (int $v.prefill.gpus) (int $v.decode.gpus) }}
{{- fail (printf "prefill.gpus (%d) and decode.gpus (%d) differ, but kvrelay has one pools.gpus_per_worker for both pools: give both groups the same GPU count" (int $v.prefill.gpus) (int $v.decode.gpus)) }}
{{- end }}
{{- end }}
{{- $m := $v.model }}
{{- if eq $m.source "image" }}
{{- if not (or (eq $m.path "default") (hasPrefix "/" $m.path)) }}
{{- fail (printf "model.path %q: with model.source image it must be \"default\" (the embedded SmolLM2) or an absolute path inside the image" $m.path) }}
{{- end }}
{{- else }}
{{- if hasPrefix "/" $m.path }}
{{- fail (printf "model.path %q: with model.source %s it is relative to model.mountPath (%s)" $m.path $m.source $m.mountPath) }}
{{- end }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName" }}
{{- end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}
{{- fail "model.source is hostPath: set model.hostPath.path" }}
{{- end }}
{{- end }}
{{- if and $v.apiKey.existingSecret $v.apiKey.value }}
{{- fail "apiKey: set either apiKey.existingSecret or apiKey.value, not both" }}
{{- end }}
{{- if and (not $v.metrics.enabled) (or $v.metrics.serviceMonitor.enabled $v.metrics.podMonitor.enabled $v.metrics.prometheusRule.enabled) }}
{{- fail "metrics.serviceMonitor / metrics.podMonitor / metrics.prometheusRule need metrics.enabled: true" }}
{{- end }}
{{- end }}

{{/*
kvrelay's ClusterConfig (cluster/config.py) as the Serve application's args: the
operator's config.* sections plus what the deployment decides.
*/}}
{{- define "kvrelay.clusterConfig" -}}
{{- $v := .Values }}
{{- $c := deepCopy (default (dict) $v.config) }}
{{- $colocated := include "kvrelay.colocated" . }}
{{- $router := default (dict) $c.router }}
{{- $_ := set $router "port" 8000 }}{{/* = http_options.port in kvrelay.serveConfig */}}
{{- if $v.model.servedModelName }}
{{- $_ := set $router "served_model_name" $v.model.servedModelName }}
{{- end }}
{{- $engine := default (dict) $c.engine }}
{{- $_ := set $engine "model" (include "kvrelay.engineModel" .) }}
{{- $pools := default (dict) $c.pools }}
{{- $decodeRes := dict (include "kvrelay.rayResource" "decode") 1 }}
{{- $_ := set $pools "decode_workers" (int $v.decode.replicas) }}
{{- $_ := set $pools "decode_resources" $decodeRes }}
{{- $_ := set $pools "gpus_per_worker" (int $v.decode.gpus) }}
{{- if $colocated }}
{{- $_ := set $pools "prefill_workers" 0 }}
{{- else }}
{{- $_ := set $pools "prefill_workers" (int $v.prefill.replicas) }}
{{- $_ := set $pools "prefill_resources" (dict (include "kvrelay.rayResource" "prefill") 1) }}
{{- end }}
{{- $metrics := dict "enabled" $v.metrics.enabled "host" "0.0.0.0" "worker_port" (int $v.metrics.workerPort) }}
{{- $out := dict "router" $router "engine" $engine "pools" $pools "metrics" $metrics }}
{{- with $c.transfer }}{{ $_ := set $out "transfer" . }}{{ end }}
{{- with $c.deadlines }}{{ $_ := set $out "deadlines" . }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/*
The RayService's serveConfigV2 (Ray Serve's multi-application config). The
deployment's ray_actor_options replace the ones in router/serve_app.py as a whole, so
num_cpus 0 is repeated here.
*/}}
{{- define "kvrelay.serveConfig" -}}
# Generated by the kvrelay chart from its values; kvrelay validates args at deploy time.
proxy_location: HeadOnly  # the router replica lives on the head
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: kvrelay
    route_prefix: /
    import_path: router.serve_app:build
    args:
      {{- include "kvrelay.clusterConfig" . | nindent 6 }}
    deployments:
      - name: kvrelay-router
        ray_actor_options:
          num_cpus: 0
          resources:
            {{ include "kvrelay.rayResource" "router" }}: 0.01
{{- end }}

{{/* Volumes and mounts shared by every pod: the model (pvc / hostPath) and /dev/shm. */}}
{{- define "kvrelay.volumes" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    {{- with $m.hostPath.type }}
    type: {{ . }}
    {{- end }}
{{- end }}
{{- if .Values.sharedMemory.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.sharedMemory.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "kvrelay.volumeMounts" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.sharedMemory.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* Pod-level settings of one group: $ is (dict "root" $ "group" .Values.<group>). */}}
{{- define "kvrelay.podSpecCommon" -}}
{{- $root := .root }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "kvrelay.volumes" $root | trim) }}
volumes:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod template metadata of one group: (dict "root" $ "group" ... "component" ...). */}}
{{- define "kvrelay.podMetadata" -}}
labels:
  {{- include "kvrelay.podSelectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .group.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .group.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* One worker group: (dict "root" $ "role" "prefill"|"decode"). */}}
{{- define "kvrelay.workerGroup" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $g := index $root.Values $role }}
{{- $resources := deepCopy (default (dict) $g.resources) }}
{{- if gt (int $g.gpus) 0 }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits "nvidia.com/gpu" (int $g.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $params := merge (dict "resources" (include "kvrelay.rayStartResources" $role)) (deepCopy (default (dict) $g.rayStartParams)) }}
- groupName: {{ $role }}
  replicas: {{ int $g.replicas }}
  minReplicas: {{ int $g.minReplicas }}
  maxReplicas: {{ int $g.maxReplicas }}
  rayStartParams:
    {{- toYaml $params | nindent 4 }}
  template:
    metadata:
      {{- include "kvrelay.podMetadata" (dict "root" $root "group" $g "component" $role) | trim | nindent 6 }}
    spec:
      {{- include "kvrelay.podSpecCommon" (dict "root" $root "group" $g) | trim | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ include "kvrelay.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            - name: KVRELAY_LOG_LEVEL
              value: {{ $root.Values.logLevel | quote }}
            {{- with $g.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- if $root.Values.metrics.enabled }}
          ports:
            - name: metrics
              containerPort: {{ int $root.Values.metrics.workerPort }}
              protocol: TCP
          {{- end }}
          {{- with $resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with (include "kvrelay.volumeMounts" $root | trim) }}
          volumeMounts:
            {{- . | nindent 12 }}
          {{- end }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
{{- end }}

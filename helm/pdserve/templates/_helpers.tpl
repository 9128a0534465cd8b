{{/*
Names, labels, the checks a schema cannot express, and the pdserve config that
becomes serveConfigV2. Helpers return strings; the structured ones return JSON
(read back with fromJson) so numbers and quoting survive exactly.
*/}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The RayService name. KubeRay refuses RayService names over 47 characters (it
appends suffixes for the RayCluster and its Services) and names that are not
DNS-1035 labels (pdserve.validate checks the latter).
*/}}
{{- define "pdserve.fullname" -}}
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

{{- define "pdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image tag that runs: image.tag, or the chart's appVersion. */}}
{{- define "pdserve.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "pdserve.imageTag" .) }}
{{- end }}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of the pods. No helm.sh/chart here: KubeRay makes a new RayCluster (and
needs the GPUs twice over for a while) whenever the pod templates change, and a
chart version bump alone should not do that.
*/}}
{{- define "pdserve.podLabels" -}}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "pdserve.imageTag" . | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ include "pdserve.chart" . }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "pdserve.imageTag" . | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* The Service in front of Serve's HTTP and gRPC proxies (KubeRay keeps it pointed at the serving RayCluster). */}}
{{- define "pdserve.serveServiceName" -}}
{{- printf "%s-serve-svc" (include "pdserve.fullname" .) }}
{{- end }}

{{/*
A pool's replica range as JSON {"min": N, "max": M, "autoscaled": bool}.
Fixed when minReplicas and maxReplicas are null: min = max = replicas.
*/}}
{{- define "pdserve.poolRange" -}}
{{- $p := . }}
{{- if and (kindIs "invalid" $p.minReplicas) (kindIs "invalid" $p.maxReplicas) }}
{{- dict "min" (int $p.replicas) "max" (int $p.replicas) "autoscaled" false | toJson }}
{{- else }}
{{- $min := int $p.minReplicas }}
{{- $max := int $p.maxReplicas }}
{{- dict "min" $min "max" $max "autoscaled" (ne $min $max) | toJson }}
{{- end }}
{{- end }}

{{/* A pool's size in words, for NOTES.txt. */}}
{{- define "pdserve.poolSummary" -}}
{{- $r := include "pdserve.poolRange" . | fromJson }}
{{- if $r.autoscaled }}{{ int $r.min }}..{{ int $r.max }} pods (autoscaled){{ else }}{{ int $r.min }} pod(s) (fixed){{ end }}
{{- end }}

{{/* Where every pod finds the model. */}}
{{- define "pdserve.modelPath" -}}
{{- if .Values.model.hub.repo }}
{{- print "/models/hub/model" }}
{{- else }}
{{- .Values.model.path | default "" | toString }}
{{- end }}
{{- end }}

{{/*
Checks values.schema.json cannot express. Each failure names the value and says
what to do; `helm install` and `helm template` stop on the first one.
*/}}
{{- define "pdserve.validate" -}}
{{- $v := .Values }}
{{- $fullname := include "pdserve.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $fullname) }}
{{- fail (printf "the RayService name %q must start with a letter and hold only a-z, 0-9 and '-' (KubeRay needs a DNS-1035 label): choose another release name or set fullnameOverride" $fullname) }}
{{- end }}
{{- range $name := list "prefill" "decode" }}
{{- $p := index $v $name }}
{{- $hasMin := not (kindIs "invalid" $p.minReplicas) }}
{{- $hasMax := not (kindIs "invalid" $p.maxReplicas) }}
{{- if ne $hasMin $hasMax }}
{{- fail (printf "%s.minReplicas and %s.maxReplicas go together: set both to autoscale the pool, or neither for a fixed pool of %s.replicas" $name $name $name) }}
{{- end }}
{{- if $hasMin }}
{{- if gt (int $p.minReplicas) (int $p.maxReplicas) }}
{{- fail (printf "%s.minReplicas (%d) is above %s.maxReplicas (%d)" $name (int $p.minReplicas) $name (int $p.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $p.replicas) (int $p.minReplicas)) (gt (int $p.replicas) (int $p.maxReplicas)) }}
{{- fail (printf "%s.replicas (%d), the initial size, must lie within %s.minReplicas..%s.maxReplicas (%d..%d)" $name (int $p.replicas) $name $name (int $p.minReplicas) (int $p.maxReplicas)) }}
{{- end }}
{{- else if lt (int $p.replicas) 1 }}
{{- fail (printf "%s.replicas: a fixed pool needs at least one replica, got %d (or set %s.minReplicas: 0 and %s.maxReplicas to scale from zero)" $name (int $p.replicas) $name $name) }}
{{- end }}
{{- end }}
{{- $hub := $v.model.hub }}
{{- if $hub.repo }}
{{- if not $hub.tokenSecret }}
{{- fail "model.hub.repo is a run-time download from the Hugging Face hub: opt in by also setting model.hub.tokenSecret (a Secret with the key `token`), or serve a model from the image (model.path) or a volume (model.pvc)" }}
{{- end }}
{{- if $v.model.pvc }}
{{- fail "model.hub.repo and model.pvc are two model sources: set only one" }}
{{- end }}
{{- else if not $v.model.path }}
{{- fail "no model given: set model.path (a model directory in the image, default /models/default), or model.pvc with model.path under model.pvcMountPath, or opt in to a hub download with model.hub.repo and model.hub.tokenSecret" }}
{{- else if $v.model.pvc }}
{{- $mount := trimSuffix "/" $v.model.pvcMountPath }}
{{- if not (hasPrefix (printf "%s/" $mount) (printf "%s/" (trimSuffix "/" $v.model.path))) }}
{{- fail (printf "model.path (%s) must lie under model.pvcMountPath (%s), where model.pvc (%s) is mounted" $v.model.path $v.model.pvcMountPath $v.model.pvc) }}
{{- end }}
{{- end }}
{{- $http := int $v.router.httpPort }}
{{- $grpc := int $v.router.grpcPort }}
{{- if eq $http $grpc }}
{{- fail (printf "router.httpPort and router.grpcPort must differ, both are %d" $http) }}
{{- end }}
{{- $rayPorts := dict "6379" "Ray's GCS" "8265" "Ray's dashboard" "10001" "the Ray client server" "52365" "Ray's dashboard agent" "8080" "Ray's metrics export" }}
{{- range $key, $port := dict "router.httpPort" $http "router.grpcPort" $grpc }}
{{- if hasKey $rayPorts (toString $port) }}
{{- fail (printf "%s (%d) is taken by %s on the Ray head: choose another port" $key $port (get $rayPorts (toString $port))) }}
{{- end }}
{{- end }}
{{- $config := $v.config | default dict }}
{{- $managed := dict
    "model" (list "path" "dtype")
    "prefill" (list "replicas" "gpus_per_replica" "tensor_parallel_size" "ray_resources")
    "decode" (list "replicas" "gpus_per_replica" "tensor_parallel_size" "ray_resources")
    "router" (list "http_host" "http_port" "grpc_port" "prefill_policy" "decode_policy" "ray_resources")
    "slo" (list "ttft_ms" "tpot_ms") }}
{{- range $section, $keys := $managed }}
{{- $given := index $config $section | default dict }}
{{- range $key := $keys }}
{{- if hasKey $given $key }}
{{- fail (printf "config.%s.%s has its own chart value (see values.yaml, e.g. %s.*): set it there, not under config" $section $key $section) }}
{{- end }}
{{- end }}
{{- end }}
{{- if gt (int (dig "colocated" "replicas" 0 $config)) 0 }}
{{- fail "config.colocated: this chart runs separate prefill and decode worker groups; colocated mode is not supported here" }}
{{- end }}
{{- end }}

{{/*
A pool's section of the pdserve config (prefill.* or decode.*), as JSON.
Params: dict "root" $ "name" "prefill"|"decode".
*/}}
{{- define "pdserve.poolConfig" -}}
{{- $p := index .root.Values .name }}
{{- $range := include "pdserve.poolRange" $p | fromJson }}
{{- $replicas := int $range.min }}
{{- if $range.autoscaled }}
{{- $replicas = printf "%d:%d" (int $range.min) (int $range.max) }}
{{- end }}
{{- $pool := dict "replicas" $replicas "gpus_per_replica" (int $p.gpusPerReplica) "tensor_parallel_size" (int ($p.tensorParallelSize | default 1)) }}
{{- if .root.Values.placement.pinPoolsToGroups }}
{{- $_ := set $pool "ray_resources" (dict .name 1) }}
{{- end }}
{{- toJson $pool }}
{{- end }}

{{/*
The pdserve config (the schema of `pdserve serve`'s config.yaml) as JSON: the
chart's own values, merged over `config`. It is the Serve application's args.
*/}}
{{- define "pdserve.pdserveConfig" -}}
{{- $v := .Values }}
{{- $router := dict
    "http_host" "0.0.0.0"
    "http_port" (int $v.router.httpPort)
    "grpc_port" (int $v.router.grpcPort)
    "prefill_policy" $v.router.prefillPolicy
    "decode_policy" $v.router.decodePolicy }}
{{- if $v.placement.pinPoolsToGroups }}
{{- $_ := set $router "ray_resources" (dict "router" 1) }}
{{- end }}
{{- $model := dict "path" (include "pdserve.modelPath" .) "dtype" $v.model.dtype }}
{{- $names := $v.model.servedModelName | default list }}
{{- if and (not $names) $v.model.hub.repo }}
{{- $names = list $v.model.hub.repo }}
{{- end }}
{{- if $names }}
{{- $_ := set $model "served_model_name" $names }}
{{- end }}
{{- $managed := dict
    "model" $model
    "prefill" (include "pdserve.poolConfig" (dict "root" . "name" "prefill") | fromJson)
    "decode" (include "pdserve.poolConfig" (dict "root" . "name" "decode") | fromJson)
    "router" $router
    "slo" (dict "ttft_ms" $v.slo.ttftMs "tpot_ms" $v.slo.tpotMs) }}
{{- mergeOverwrite (deepCopy ($v.config | default dict)) $managed | toJson }}
{{- end }}

{{/*
Ray Serve's config (serveConfigV2), as JSON: one application, built by
pdserve.cluster.app:build_app from the pdserve config.
*/}}
{{- define "pdserve.serveConfig" -}}
{{- $v := .Values }}
{{- $config := include "pdserve.pdserveConfig" . | fromJson }}
{{- $app := dict
    "name" "pdserve"
    "route_prefix" "/"
    "import_path" "pdserve.cluster.app:build_app"
    "args" $config }}
{{- /* A MIN:MAX pool: pdserve's application-level policy sizes both pools together. */}}
{{- if or (contains ":" (toString $config.prefill.replicas)) (contains ":" (toString $config.decode.replicas)) }}
{{- $_ := set $app "autoscaling_policy" (dict
    "policy_function" "pdserve.cluster.autoscaling:PdserveAutoscalingPolicy"
    "policy_kwargs" (dict "config" $config)) }}
{{- end }}
{{- /* Ray Serve's proxies stay off: the router replicas (on the head) listen on the ports themselves. */}}
{{- dict
    "proxy_location" "Disabled"
    "applications" (list $app) | toPrettyJson }}
{{- end }}

{{/* Environment shared by every Ray container. */}}
{{- define "pdserve.commonEnv" -}}
{{- if not .Values.model.hub.repo }}
# No hub access at run time: the model is in the image or on the volume.
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
- name: PDSERVE_MODEL_PATH
  value: {{ include "pdserve.modelPath" . | quote }}
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* NCCL settings of the worker containers (the KV transfer from prefill to decode). */}}
{{- define "pdserve.ncclEnv" -}}
{{- $n := .Values.nccl }}
- name: NCCL_DEBUG
  value: {{ $n.debug | quote }}
{{- if $n.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ $n.socketIfname | quote }}
{{- end }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" $n.ibDisable | quote }}
- name: NCCL_NVLS_ENABLE
  value: {{ ternary "1" "0" $n.nvlsEnable | quote }}
{{- range $name, $value := $n.extraEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Volumes for the model (a PVC, or the emptyDir of an opted-in hub download). */}}
{{- define "pdserve.modelVolumes" -}}
{{- if .Values.model.hub.repo }}
- name: model-hub
  emptyDir:
    sizeLimit: {{ .Values.model.hub.sizeLimit }}
{{- else if .Values.model.pvc }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "pdserve.modelVolumeMounts" -}}
{{- if .Values.model.hub.repo }}
- name: model-hub
  mountPath: /models/hub
{{- else if .Values.model.pvc }}
- name: model
  mountPath: {{ .Values.model.pvcMountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The opt-in hub download, run before Ray starts on each pod. */}}
{{- define "pdserve.modelInitContainers" -}}
{{- if .Values.model.hub.repo }}
- name: download-model
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import os
      from huggingface_hub import snapshot_download
      snapshot_download(os.environ["HF_MODEL_REPO"], revision=os.environ["HF_MODEL_REVISION"],
                        local_dir=os.environ["PDSERVE_MODEL_PATH"])
  env:
    # The image sets HF_HUB_OFFLINE=1; this container is the one opted in.
    - name: HF_HUB_OFFLINE
      value: "0"
    - name: HF_MODEL_REPO
      value: {{ .Values.model.hub.repo | quote }}
    - name: HF_MODEL_REVISION
      value: {{ .Values.model.hub.revision | quote }}
    - name: PDSERVE_MODEL_PATH
      value: {{ include "pdserve.modelPath" . | quote }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ .Values.model.hub.tokenSecret }}
          key: token
  volumeMounts:
    - name: model-hub
      mountPath: /models/hub
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the head and the worker groups. Param: dict "root" $ "group" <values of the group>. */}}
{{- define "pdserve.podSpecCommon" -}}
{{- $root := .root }}
{{- with $root.Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
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
{{- with (include "pdserve.modelInitContainers" $root) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
{{- with (include "pdserve.modelVolumes" $root) }}
volumes:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}

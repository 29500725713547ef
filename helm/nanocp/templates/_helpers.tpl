{{- define "nanocp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "nanocp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: nanocp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "nanocp.selector" -}}
app.kubernetes.io/name: nanocp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The router's discovery selects worker pods with exactly these labels. */}}
{{- define "nanocp.workerSelector" -}}
app.kubernetes.io/name=nanocp,app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=worker
{{- end -}}

{{- define "nanocp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "nanocp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "nanocp.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{- define "nanocp.otelEnv" -}}
{{- if .Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .Values.otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .Values.otel.samplerArg | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME)%s" .Release.Namespace (ternary (printf ",%s" .Values.otel.resourceAttributes) "" (ne .Values.otel.resourceAttributes "")) | quote }}
{{- else }}
- name: OTEL_SDK_DISABLED
  value: "true"
{{- end }}
{{- end -}}

{{/* GPUs and RDMA devices: the same map goes to requests and limits (extended resources can not be overcommitted). */}}
{{- define "nanocp.workerDevices" -}}
{{ .Values.workers.gpuResource }}: {{ .Values.workers.gpus }}
{{- if .Values.workers.rdma.enabled }}
{{ .Values.workers.rdma.resource }}: {{ .Values.workers.rdma.count }}
{{- end }}
{{- end -}}

{{- define "nanocp.checks" -}}
{{- if and .Values.numExperts (ne (mod (int .Values.numExperts) (int .Values.workers.groupSize)) 0) -}}
{{- fail (printf "numExperts (%v) must be divisible by workers.groupSize (%v): each instance of a group holds an equal share of the experts" .Values.numExperts .Values.workers.groupSize) -}}
{{- end -}}
{{- if and .Values.policy.cpDegree (gt (int .Values.policy.cpDegree) (int .Values.workers.groupSize)) -}}
{{- fail (printf "policy.cpDegree (%v) can not exceed workers.groupSize (%v)" .Values.policy.cpDegree .Values.workers.groupSize) -}}
{{- end -}}
{{- end -}}

{{/*
The pod spec of a worker (StatefulSet or LWS). Context: dict root, group (label value), rank (env source),
masterAddr.
*/}}
{{- define "nanocp.workerPod" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $topo := $v.topology -}}
{{- $tls := ne $v.security.internalTls.secretName "" -}}
metadata:
  labels:
    {{- include "nanocp.labels" $root | nindent 4 }}
    app.kubernetes.io/component: worker
    {{- if .group }}
    nanocp.io/group: {{ .group | quote }}
    {{- end }}
    {{- if and $topo.kueue.enabled $topo.kueue.queueName }}
    kueue.x-k8s.io/queue-name: {{ $topo.kueue.queueName | quote }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- if $topo.kueue.enabled }}
    kueue.x-k8s.io/podset-{{ $topo.kueue.mode }}-topology: {{ $topo.kueue.level | quote }}
    {{- end }}
spec:
  serviceAccountName: {{ include "nanocp.fullname" $root }}-worker
  automountServiceAccountToken: false
  securityContext:
    {{- include "nanocp.podSecurityContext" $root | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.workers.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.workers.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- /* StatefulSet groups are told apart by nanocp.io/group; LWS groups by their group-key label (matchLabelKeys). */}}
  {{- $workers := dict "app.kubernetes.io/instance" $root.Release.Name "app.kubernetes.io/component" "worker" }}
  {{- $own := dict "matchLabels" (ternary (merge (dict "nanocp.io/group" .group) $workers) $workers (ne .group "")) }}
  affinity:
    podAffinity:
      {{- if eq $topo.mode "hard" }}
      requiredDuringSchedulingIgnoredDuringExecution:
        - labelSelector: {{- toYaml $own | nindent 12 }}
          {{- if not .group }}
          matchLabelKeys: [leaderworkerset.sigs.k8s.io/group-key]
          {{- end }}
          topologyKey: {{ $topo.hardKey | default (first $topo.keys) | quote }}
      {{- end }}
      preferredDuringSchedulingIgnoredDuringExecution:
        {{- range $i, $key := $topo.keys }}
        - weight: {{ div 100 (add1 $i) }}
          podAffinityTerm:
            labelSelector: {{- toYaml $own | nindent 14 }}
            {{- if not $.group }}
            matchLabelKeys: [leaderworkerset.sigs.k8s.io/group-key]
            {{- end }}
            topologyKey: {{ $key | quote }}
        {{- end }}
    {{- if and (gt (int $v.workers.groups) 1) (gt (int $topo.spreadGroupsWeight) 0) }}
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: {{ $topo.spreadGroupsWeight }}
          podAffinityTerm:
            labelSelector:
              matchLabels: {{- toYaml $workers | nindent 16 }}
              {{- if .group }}
              matchExpressions:
                - {key: nanocp.io/group, operator: NotIn, values: [{{ .group | quote }}]}
              {{- end }}
            {{- if not .group }}
            mismatchLabelKeys: [leaderworkerset.sigs.k8s.io/group-key]
            {{- end }}
            topologyKey: {{ first $topo.keys | quote }}
    {{- end }}
  terminationGracePeriodSeconds: {{ add $v.shutdownGraceSeconds 10 }}
  containers:
    - name: worker
      image: {{ include "nanocp.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      command: ["nanocp"]
      args:
        - worker
        - --model=$(NANOCP_MODEL)
        - --host=0.0.0.0
        - --port={{ $v.workers.port }}
        - --instance-id=$(POD_NAME)
        - --device=$(NANOCP_DEVICE)
        - --page-size=$(NANOCP_PAGE_SIZE)
        - --num-pages=$(NANOCP_NUM_PAGES)
        - --max-step-tokens=$(NANOCP_MAX_STEP_TOKENS)
        - --max-running=$(NANOCP_MAX_RUNNING)
        - --collective-timeout=$(NANOCP_COLLECTIVE_TIMEOUT)
        - --metrics-port={{ $v.workers.metricsPort }}
        - --step-spans-every=$(NANOCP_STEP_SPANS_EVERY)
        {{- if $v.engine.dtype }}
        - --dtype=$(NANOCP_DTYPE)
        {{- end }}
        {{- include "nanocp.securityArgs" (dict "root" $root "router" false) | trim | nindent 8 }}
      envFrom:
        - configMapRef:
            name: {{ include "nanocp.fullname" $root }}
      env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: RANK
          valueFrom: {fieldRef: {fieldPath: {{ printf "metadata.labels['%s']" .rankLabel | quote }}}}
        - name: WORLD_SIZE
          value: {{ $v.workers.groupSize | quote }}
        - name: MASTER_ADDR
          value: {{ .masterAddr | quote }}
        - name: MASTER_PORT
          value: {{ $v.workers.masterPort | quote }}
        - name: NANOCP_TOPOLOGY_DOMAIN
          valueFrom: {fieldRef: {fieldPath: {{ printf "metadata.annotations['%s']" $topo.domainAnnotation | quote }}}}
        {{- with $v.workers.nccl.ibHca }}
        - name: NCCL_IB_HCA
          value: {{ . | quote }}
        {{- end }}
        {{- with $v.workers.nccl.socketIfname }}
        - name: NCCL_SOCKET_IFNAME
          value: {{ . | quote }}
        {{- end }}
        {{- range $name, $value := $v.workers.nccl.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
        {{- include "nanocp.otelEnv" $root | trim | nindent 8 }}
        {{- with $v.workers.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $v.workers.port }}
        - name: rendezvous
          containerPort: {{ $v.workers.masterPort }}
        - name: metrics
          containerPort: {{ $v.workers.metricsPort }}
      startupProbe:
        {{- include "nanocp.probeHandler" (dict "port" $v.workers.port "tls" $tls) | nindent 8 }}
        {{- toYaml $v.workers.probes.startup | nindent 8 }}
      readinessProbe:
        {{- include "nanocp.probeHandler" (dict "port" $v.workers.port "tls" $tls) | nindent 8 }}
        {{- toYaml $v.workers.probes.readiness | nindent 8 }}
      livenessProbe:
        {{- include "nanocp.probeHandler" (dict "port" $v.workers.port "tls" $tls) | nindent 8 }}
        {{- toYaml $v.workers.probes.liveness | nindent 8 }}
      resources:
        requests:
          {{- with $v.workers.resources.requests }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- include "nanocp.workerDevices" $root | nindent 10 }}
        limits:
          {{- with $v.workers.resources.limits }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- include "nanocp.workerDevices" $root | nindent 10 }}
      securityContext:
        {{- include "nanocp.containerSecurityContext" (dict "rdma" $v.workers.rdma.enabled) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- include "nanocp.writableMounts" $root | nindent 8 }}
        {{- include "nanocp.secretMounts" (dict "root" $root "router" false) | trim | nindent 8 }}
        {{- with $v.workers.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.workers.shm.sizeLimit }}
    {{- include "nanocp.writableVolumes" $root | nindent 4 }}
    {{- include "nanocp.secretVolumes" (dict "root" $root "router" false) | trim | nindent 4 }}
    {{- with $v.workers.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

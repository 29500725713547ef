{{/* Where the pods find their secrets: each Secret is mounted whole (no subPath), so a rotated Secret reaches the
files, which nanocp reads again when they change. */}}
{{- define "nanocp.secretsDir" -}}/var/run/nanocp{{- end -}}

{{- define "nanocp.internalTokenSecret" -}}
{{ .Values.security.internalToken.existingSecret | default (printf "%s-internal-token" (include "nanocp.fullname" .)) }}
{{- end -}}

{{/* Non-root, the RuntimeDefault seccomp profile; fsGroup makes mounted secrets readable by the user. */}}
{{- define "nanocp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsUser }}
fsGroup: {{ .Values.security.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Context: dict root, rdma (bool). RDMA registers (pins) memory: IPC_LOCK, and only then. */}}
{{- define "nanocp.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
  {{- if .rdma }}
  add: ["IPC_LOCK"]
  {{- end }}
{{- end -}}

{{/* The root filesystem is read-only: what nanocp and its libraries write (temporary files; caches of Triton,
FlashInfer's JIT and Hugging Face under $HOME) goes to emptyDirs. */}}
{{- define "nanocp.writableMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/nanocp
{{- end -}}

{{- define "nanocp.writableVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{/* Context: dict root, router (bool). The secret volumes of a router or a worker, then their mounts. */}}
{{- define "nanocp.secretVolumes" -}}
{{- $s := .root.Values.security -}}
{{- if $s.internalToken.enabled }}
- name: internal-token
  secret:
    secretName: {{ include "nanocp.internalTokenSecret" .root }}
{{- end }}
{{- with $s.internalTls.secretName }}
- name: internal-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- if .router }}
{{- with $s.publicTls.secretName }}
- name: public-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- with $s.apiTokens.secretName }}
- name: api-tokens
  secret:
    secretName: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "nanocp.secretMounts" -}}
{{- $s := .root.Values.security -}}
{{- $dir := include "nanocp.secretsDir" .root -}}
{{- if $s.internalToken.enabled }}
- name: internal-token
  mountPath: {{ $dir }}/internal-token
  readOnly: true
{{- end }}
{{- if $s.internalTls.secretName }}
- name: internal-tls
  mountPath: {{ $dir }}/internal-tls
  readOnly: true
{{- end }}
{{- if and .router $s.publicTls.secretName }}
- name: public-tls
  mountPath: {{ $dir }}/public-tls
  readOnly: true
{{- end }}
{{- if and .router $s.apiTokens.secretName }}
- name: api-tokens
  mountPath: {{ $dir }}/api-tokens
  readOnly: true
{{- end }}
{{- end -}}

{{/* Context: dict root, router (bool). The flags that read the mounted secrets. */}}
{{- define "nanocp.securityArgs" -}}
{{- $s := .root.Values.security -}}
{{- $dir := include "nanocp.secretsDir" .root -}}
- --shutdown-grace={{ .root.Values.shutdownGraceSeconds }}
{{- if $s.internalToken.enabled }}
- --internal-token-file={{ $dir }}/internal-token/token
{{- end }}
{{- if and $s.internalTls.secretName .router }}
- --worker-tls-ca={{ $dir }}/internal-tls/ca.crt
- --worker-tls-cert={{ $dir }}/internal-tls/tls.crt
- --worker-tls-key={{ $dir }}/internal-tls/tls.key
- --worker-tls-server-name={{ $s.internalTls.serverName }}
{{- else if $s.internalTls.secretName }}
- --tls-cert={{ $dir }}/internal-tls/tls.crt
- --tls-key={{ $dir }}/internal-tls/tls.key
- --tls-client-ca={{ $dir }}/internal-tls/ca.crt
{{- end }}
{{- if and .router $s.publicTls.secretName }}
- --tls-cert={{ $dir }}/public-tls/tls.crt
- --tls-key={{ $dir }}/public-tls/tls.key
{{- end }}
{{- if and .router $s.apiTokens.secretName }}
- --api-tokens={{ $dir }}/api-tokens/tokens
{{- if $s.apiTokens.admins }}
- --admin-tokens={{ $dir }}/api-tokens/admin-tokens
{{- end }}
{{- end }}
{{- end -}}

{{/* Context: dict root, port, tls (bool). kubelet's gRPC probe speaks no TLS: over TLS a probe checks the port. */}}
{{- define "nanocp.probeHandler" -}}
{{- if .tls -}}
tcpSocket: {port: {{ .port }}}
{{- else -}}
grpc: {port: {{ .port }}}
{{- end -}}
{{- end -}}

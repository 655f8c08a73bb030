{{/* Names and labels. */}}
{{- define "regrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "regrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "regrelay.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "regrelay.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* (dict "root" . "component" "front") */}}
{{- define "regrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regrelay.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "regrelay.labels" -}}
{{ include "regrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "regrelay.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The --registry upstream's name: its host[:port]. */}}
{{- define "regrelay.registryName" -}}
{{- (urlParse .Values.registry).host }}
{{- end }}

{{/*
Shutdown flags, and the check that the pod's grace period outlasts them.
(dict "root" . "shutdown" <shutdown values> "grace" <terminationGracePeriodSeconds or 30>)
*/}}
{{- define "regrelay.shutdownArgs" -}}
{{- $s := .shutdown }}
{{- $drain := max (int $s.graceSecs) (int $s.uploadDrainSecs) }}
{{- if le (int .grace) (add (int $s.delaySecs) $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdown delay (%d) + max(grace, upload drain) (%d)" (int .grace) (int $s.delaySecs) $drain) }}
{{- end -}}
- --shutdown-delay-secs={{ $s.delaySecs }}
- --shutdown-grace-secs={{ $s.graceSecs }}
- --upload-drain-secs={{ $s.uploadDrainSecs }}
{{- end }}

{{/*
Pod-level security context: fixed non-root uid and gid; fsGroup so the Secret volumes' files are
group-readable (0440) by a group the container is in (see regrelay.sessionKeysDir).
*/}}
{{- define "regrelay.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.uid }}
fsGroup: {{ .Values.uid }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context (restricted Pod Security Standard). */}}
{{- define "regrelay.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.uid }}
runAsGroup: {{ .Values.uid }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
An exec probe: `regrelay healthcheck` inside the container, for a regrelay listening on the
loopback (the kubelet's httpGet goes to the pod IP, where nothing listens then).
(dict "port" <port> "path" "/-/ready")
*/}}
{{- define "regrelay.execProbe" -}}
exec:
  command:
    - /usr/local/bin/regrelay
    - healthcheck
    - --url=http://127.0.0.1:{{ .port }}{{ .path }}
    - --timeout-secs=3
{{- end }}

{{/*
Where the private files (key ring, credentials) are mounted: straight from their Secret volumes,
defaultMode 0400. Under the pod's fsGroup the kubelet makes them 0440 with group fsGroup
(kubernetes/kubernetes#57923) and gives the container fsGroup as a supplementary group; regrelay
accepts a 0440 file whose group is one of its own, and reads it at start.
*/}}
{{- define "regrelay.sessionKeysDir" -}}/run/regrelay/session-keys{{- end }}
{{- define "regrelay.credentialsDir" -}}/run/regrelay/credentials{{- end }}

{{/* The session key Secret's mount (volume "session-keys"). */}}
{{- define "regrelay.sessionKeysMount" -}}
- name: session-keys
  mountPath: {{ include "regrelay.sessionKeysDir" . }}
  readOnly: true
{{- end }}

{{/* The session key Secret volume. */}}
{{- define "regrelay.sessionKeysVolume" -}}
- name: session-keys
  secret:
    secretName: {{ .Values.sessionKeys.secretName }}
    defaultMode: 0400
    items:
      - key: {{ .Values.sessionKeys.key }}
        path: session.keys
{{- end }}

{{/*
The pull-through cache: its flags, its mount (volume "cache" at the directory it passes) and
its volume. (dict "cache" <cache values>)
*/}}
{{- define "regrelay.cacheArgs" -}}
{{- $c := .cache -}}
- --cache-dir={{ $c.dir }}
- --cache-max-bytes={{ int64 $c.maxBytes }}
{{- if $c.serveStale }}
- --cache-serve-stale
{{- end }}
{{- end }}

{{/*
The shared bucket behind a cache (cache.store): its flags, and the environment that carries its
key. (dict "cache" <cache values>)
*/}}
{{- define "regrelay.cacheStoreArgs" -}}
{{- $s := .cache.store -}}
- --cache-store={{ $s.url }}
- --cache-store-max-bytes={{ int64 $s.maxBytes }}
{{- if $s.endpoint }}
- --cache-s3-endpoint={{ $s.endpoint }}
{{- end }}
{{- if $s.region }}
- --cache-s3-region={{ $s.region }}
{{- end }}
{{- if $s.redirect }}
- --cache-redirect
{{- end }}
{{- end }}

{{- define "regrelay.cacheStoreEnv" -}}
{{- $s := .cache.store -}}
{{- if not $s.credentialsSecret }}
{{- fail "cache.store.url needs cache.store.credentialsSecret: a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" }}
{{- end }}
- secretRef:
    name: {{ $s.credentialsSecret }}
{{- end }}

{{- define "regrelay.cacheMount" -}}
- name: cache
  mountPath: {{ .cache.dir }}
{{- end }}

{{/* The volume's size: cache.size, else maxBytes plus 10 % (index, partial fills). */}}
{{- define "regrelay.cacheSize" -}}
{{- $c := .cache -}}
{{- $c.size | default (add (int64 $c.maxBytes) (div (int64 $c.maxBytes) 10)) }}
{{- end }}

{{- define "regrelay.cacheVolume" -}}
{{- $c := .cache -}}
- name: cache
  {{- if eq $c.volume "emptyDir" }}
  emptyDir:
    sizeLimit: {{ include "regrelay.cacheSize" . | quote }}
    {{- with $c.medium }}
    medium: {{ . }}
    {{- end }}
  {{- else if eq $c.volume "pvc" }}
  # A claim per pod, made and deleted with it (generic ephemeral volume).
  ephemeral:
    volumeClaimTemplate:
      spec:
        accessModes: [ReadWriteOnce]
        {{- with $c.storageClassName }}
        storageClassName: {{ . }}
        {{- end }}
        resources:
          requests:
            storage: {{ include "regrelay.cacheSize" . | quote }}
  {{- else }}
  {{- fail (printf "cache.volume %q: emptyDir or pvc" $c.volume) }}
  {{- end }}
{{- end }}


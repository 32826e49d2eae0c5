{{/* The chart's name, overridable with nameOverride. */}}
{{- define "mertools.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of the release's objects: fullnameOverride, else RELEASE-NAME (or RELEASE when it already
contains the chart's name), at most 63 characters (a DNS label). */}}
{{- define "mertools.fullname" -}}
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

{{- define "mertools.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "mertools.labels" -}}
helm.sh/chart: {{ include "mertools.chart" . }}
{{ include "mertools.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | toString | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: mertools
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the release's pods (the Deployment's selector, the Service's, the ServiceMonitor's). */}}
{{- define "mertools.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mertools.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mertools.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* The Secret holding the API key and its key in it; empty when no API key is configured. */}}
{{- define "mertools.apiKeySecretName" -}}
{{- if and .Values.apiKey.existingSecret .Values.apiKey.value }}
{{- fail "apiKey: set existingSecret or value, not both" }}
{{- end }}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "mertools.fullname" .) }}
{{- end }}
{{- end }}

{{- define "mertools.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/* The container's memory, request and limit alike: cacheMb + denseMb + headroomMb, in Mi. */}}
{{- define "mertools.memory" -}}
{{- printf "%dMi" (add .Values.cacheMb .Values.denseMb .Values.headroomMb) }}
{{- end }}

{{/* The server's LAYOUT argument: the layout volume's mount joined with layout.path. */}}
{{- define "mertools.layoutPath" -}}
{{- $path := trimAll "/" .Values.layout.path }}
{{- if $path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.layout.mountPath) $path }}
{{- else }}
{{- .Values.layout.mountPath }}
{{- end }}
{{- end }}

{{/* config.toml: the config values plus cache_mb = cacheMb. */}}
{{- define "mertools.configToml" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- /* values reach templates as float64 (YAML through JSON): give the integer keys back their type, or toToml
writes max_queue = 64.0 */}}
{{- range $key := list "max_concurrency" "max_queue" "prefill_chunk" "top_k" "max_tokens" "threads" "draft_tokens" "prefetch_depth" }}
{{- if hasKey $config $key }}
{{- $_ := set $config $key (int64 (get $config $key)) }}
{{- end }}
{{- end }}
{{- $_ := set $config "cache_mb" (int64 .Values.cacheMb) }}
{{- toToml $config }}
{{- end }}

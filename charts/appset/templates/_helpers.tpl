{{/* Common names and labels. */}}
{{- define "appset.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "appset.operator" -}}{{ include "appset.fullname" . }}-operator{{- end -}}
{{- define "appset.webhook" -}}{{ include "appset.fullname" . }}-webhook{{- end -}}
{{- define "appset.labels" -}}
app.kubernetes.io/name: appset
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "appset.selector" -}}
app.kubernetes.io/name: appset
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "appset.image" -}}
{{- $root := index . 0 -}}{{- $component := index . 1 -}}
{{ printf "%s-%s:%s" $root.Values.image.repositoryPrefix $component (default $root.Chart.AppVersion $root.Values.image.tag) }}
{{- end -}}
{{/* The webhook's own pods must never be sent to the webhook. */}}
{{- define "appset.webhookConfigName" -}}{{ include "appset.webhook" . }}{{- end -}}

{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "onereward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, prefixed with the chart name unless it contains it.
*/}}
{{- define "onereward.fullname" -}}
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

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "onereward.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "onereward.labels" -}}
helm.sh/chart: {{ include "onereward.chart" . }}
{{ include "onereward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: onereward
{{- end }}

{{/*
Selector labels (a component label is added by each workload).
*/}}
{{- define "onereward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onereward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the service account the MLflow, serving and pipeline pods run as.
*/}}
{{- define "onereward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "onereward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Project images: CPU (image.tag, default the chart appVersion) and GPU (image.gpuTag).
*/}}
{{- define "onereward.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "onereward.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) }}
{{- end }}

{{/*
Secret names: the existing Secret when given, else the one this chart renders.
*/}}
{{- define "onereward.s3SecretName" -}}
{{- default (printf "%s-s3" (include "onereward.fullname" .)) .Values.secrets.s3.existingSecret }}
{{- end }}

{{- define "onereward.mlflowSecretName" -}}
{{- default (printf "%s-mlflow" (include "onereward.fullname" .)) .Values.secrets.mlflow.existingSecret }}
{{- end }}

{{/*
MLflow tracking URI seen from inside the cluster.
*/}}
{{- define "onereward.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s-mlflow:%d" (include "onereward.fullname" .) (int .Values.mlflow.service.port) }}
{{- else }}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled=false" .Values.mlflow.externalTrackingUri }}
{{- end }}
{{- end }}

{{/*
Host headers the MLflow server accepts (its DNS-rebinding protection): the Service name, with any
port and as a cluster FQDN, localhost, and mlflow.allowedHosts.
*/}}
{{- define "onereward.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "onereward.fullname" .) }}
{{- $hosts := list $svc (printf "%s:*" $svc) (printf "%s.*" $svc) "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" }}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts) }}
{{- end }}

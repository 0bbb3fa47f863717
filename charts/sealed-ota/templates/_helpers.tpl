{{/* Chart name, truncated to 63 characters (a label value). */}}
{{- define "sealed-ota.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "sealed-ota.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sealed-ota.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "sealed-ota.labels" -}}
helm.sh/chart: {{ include "sealed-ota.chart" . }}
{{ include "sealed-ota.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sealed-ota
{{- end }}

{{/* Labels that select the operator pods (immutable once installed). */}}
{{- define "sealed-ota.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sealed-ota.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "sealed-ota.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sealed-ota.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sealed-ota.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Fail early on values the schema cannot express. */}}
{{- define "sealed-ota.validate" -}}
{{- if not .Values.broker.url }}
{{- fail "broker.url is required: set it to mqtts://host:port (with broker.tls.secretName) or mqtt://host:port" }}
{{- end }}
{{- end }}

{{/*
The RBAC rules for one scope where campaigns live (a watched namespace, or the whole cluster).
Only the verbs the operator's code uses: kube-runtime watchers (list, watch), the finalizer and
status writes (patch), direct reads of the Secrets and ConfigMaps a campaign names (get), and the
events.k8s.io Recorder (create, patch). No wildcards, no delete, no update.
*/}}
{{- define "sealed-ota.campaignRules" -}}
# UpdateCampaigns: the controller watches them (list, watch) and adds/removes its finalizer
# (a JSON patch on the object).
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["updatecampaigns"]
  verbs: ["list", "watch", "patch"]
# UpdateCampaign status: written by server-side apply on the status subresource.
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["updatecampaigns/status"]
  verbs: ["patch"]
# Devices: a reflector per held shard watches them (label-selected) to find the ones a campaign
# selects.
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["devices"]
  verbs: ["list", "watch"]
{{- if gt (int .Values.shards) 1 }}
# Devices, sharded: the coordinator labels a Device without its bucket label
# (ota.sealed-ota.dev/bucket, a merge patch of that one label) so that its shard's reflector sees it.
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["devices"]
  verbs: ["patch"]
{{- end }}
# Shard reports: the replica holding a shard writes its CampaignShard by server-side apply (create
# or patch); the coordinator watches them (list, watch) to add the shards up. They go with their
# campaign (owner reference), so no delete.
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["campaignshards"]
  verbs: ["list", "watch", "create", "patch"]
# Device status: the device-status writer records each device's campaign progress (server-side apply).
- apiGroups: ["ota.sealed-ota.dev"]
  resources: ["devices/status"]
  verbs: ["patch"]
# Secrets: the manager Secret, a firmware secretKeyRef and a rotation CA Secret named by a campaign
# are read (get); the controller watches Secrets (list, watch) so that fixing one wakes the campaign.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# ConfigMaps: a firmware configMapKeyRef is read (get) and watched (list, watch) like the Secrets.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
# Events: Warning/Normal events on campaigns (kube-runtime Recorder creates them and patches the
# series count of repeated ones).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Labels and annotations added to each CRD's metadata (crds.yaml indents them under metadata:). */}}
{{- define "sealed-ota.crdMetadata" -}}
labels:
  app.kubernetes.io/part-of: sealed-ota
  app.kubernetes.io/managed-by: {{ .Release.Service }}
  helm.sh/chart: {{ include "sealed-ota.chart" . }}
{{- if .Values.crds.keep }}
annotations:
  # Deleting a CRD deletes every UpdateCampaign and Device: keep them when the release goes.
  helm.sh/resource-policy: keep
{{- end }}
{{- end }}

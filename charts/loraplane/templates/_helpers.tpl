{{/* Names, labels and images shared by every template. */}}

{{- define "loraplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-loraplane, or the release name alone when it already contains the chart name. */}}
{{- define "loraplane.fullname" -}}
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

{{- define "loraplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "loraplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraplane.labels" -}}
helm.sh/chart: {{ include "loraplane.chart" . }}
{{ include "loraplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraplane
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the operator's own objects (Deployment, pods, metrics Service). */}}
{{- define "loraplane.operatorLabels" -}}
{{ include "loraplane.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "loraplane.operatorSelectorLabels" -}}
{{ include "loraplane.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "loraplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraplane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: the digest wins, the tag defaults to appVersion. */}}
{{- define "loraplane.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* Cluster-wide unless watch.namespaces lists namespaces. */}}
{{- define "loraplane.clusterWide" -}}
{{- if .Values.watch.namespaces }}false{{- else }}true{{- end }}
{{- end }}

{{/* API versions the operator gives the HPAs and PDBs it creates: what this cluster serves, unless set. */}}
{{- define "loraplane.hpaApiVersion" -}}
{{- if .Values.operator.hpaApiVersion }}
{{- .Values.operator.hpaApiVersion }}
{{- else if .Capabilities.APIVersions.Has "autoscaling/v2" }}autoscaling/v2
{{- else }}autoscaling/v2beta2
{{- end }}
{{- end }}

{{/* Training Jobs get a podFailurePolicy where the cluster supports it (beta, on by default, from 1.26). */}}
{{- define "loraplane.podFailurePolicy" -}}
{{- if .Values.operator.podFailurePolicy }}
{{- .Values.operator.podFailurePolicy }}
{{- else if semverCompare ">=1.26-0" .Capabilities.KubeVersion.Version }}true
{{- else }}false
{{- end }}
{{- end }}

{{- define "loraplane.pdbApiVersion" -}}
{{- if .Values.operator.pdbApiVersion }}
{{- .Values.operator.pdbApiVersion }}
{{- else if .Capabilities.APIVersions.Has "policy/v1" }}policy/v1
{{- else }}policy/v1beta1
{{- end }}
{{- end }}

{{/* childPods as the JSON the operator reads (LORAPLANE_CHILD_PODS, api.pods.ChildPodSettings): empty values
dropped (in childPods.trainer/engine/router too), and the operator's own imagePullSecrets when
childPods.imagePullSecrets is null. */}}
{{- define "loraplane.childPods" -}}
{{- $pods := dict }}
{{- range $key, $value := (.Values.childPods | default dict) }}
{{- if and $value (has $key (list "trainer" "engine" "router")) }}
{{- /* a component's entries (childPods.trainer/engine/router): its empty values dropped too */}}
{{- $sub := dict }}
{{- range $k, $v := $value }}
{{- if $v }}
{{- $_ := set $sub $k $v }}
{{- end }}
{{- end }}
{{- if $sub }}
{{- $_ := set $pods $key $sub }}
{{- end }}
{{- else if and $value (ne $key "imagePullSecrets") }}
{{- $_ := set $pods $key $value }}
{{- end }}
{{- end }}
{{- $secrets := .Values.imagePullSecrets }}
{{- if kindIs "slice" (.Values.childPods | default dict).imagePullSecrets }}
{{- $secrets = .Values.childPods.imagePullSecrets }}
{{- end }}
{{- if $secrets }}
{{- $_ := set $pods "imagePullSecrets" $secrets }}
{{- end }}
{{- toJson $pods }}
{{- end }}

{{/* Labels of the gateway's objects (gateway.enabled). */}}
{{- define "loraplane.gatewayLabels" -}}
{{ include "loraplane.labels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "loraplane.gatewaySelectorLabels" -}}
{{ include "loraplane.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* A label map as an equality selector string: k1=v1,k2=v2 (keys sorted). */}}
{{- define "loraplane.selectorString" -}}
{{- $terms := list }}
{{- range $k, $v := . }}
{{- $terms = append $terms (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $terms }}
{{- end }}

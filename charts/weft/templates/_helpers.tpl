{{/*
Names are fixed by the mesh's contracts (ztunnels dial weft-controller.<ns>.svc,
the CA lives in weft-ca-root, the Lease is weft-controller-leader), so one
release per cluster.
*/}}

{{/* One of the images `cargo xtask image` builds: (dict "root" . "name" "weft-ztunnel"). */}}
{{- define "weft.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{- define "weft.waypointImage" -}}
{{- if .Values.waypoint.image.repository -}}
{{ .Values.waypoint.image.repository }}:{{ .Values.waypoint.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- else -}}
{{ .Values.image.registry }}/weft-waypoint:{{ .Values.waypoint.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "weft.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "weft.controller.selector" -}}
app.kubernetes.io/name: weft-controller
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "weft.ztunnel.selector" -}}
app.kubernetes.io/name: weft-ztunnel
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The Secret holding the CA the controller signs with. */}}
{{- define "weft.caSecret" -}}
{{ .Values.ca.existingSecret | default "weft-ca-root" }}
{{- end }}

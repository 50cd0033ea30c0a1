{{/* Labels every object of the release carries. */}}
{{- define "mesh.labels" -}}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mesh.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end -}}

{{/* The Secret holding the CA's root certificate and key. */}}
{{- define "mesh.caSecret" -}}
{{ default "mesh-ca-root" .Values.ca.rootSecret }}
{{- end -}}

{{/* Chart name. */}}
{{- define "lockstep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "lockstep.fullname" -}}
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

{{- define "lockstep.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "lockstep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selects the gateway pods (not the migration job's). */}}
{{- define "lockstep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lockstep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "lockstep.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "lockstep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lockstep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lockstep.secretName" -}}
{{- default (include "lockstep.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "lockstep.jwtSecretName" -}}
{{- default (printf "%s-jwt" (include "lockstep.fullname" .)) .Values.jwtKeys.existingSecret }}
{{- end }}

{{/* "true" when a JWT key file is mounted from jwtKeys. */}}
{{- define "lockstep.jwtKeyFile" -}}
{{- if .Values.jwtKeys.publicKeyPem }}public.pem
{{- else if .Values.jwtKeys.jwks }}jwks.json
{{- else if .Values.jwtKeys.existingSecret }}{{ required "jwtKeys.existingSecretKey must be public.pem or jwks.json" .Values.jwtKeys.existingSecretKey }}
{{- end }}
{{- end }}

{{/* The port of a listen address ("0.0.0.0:8080" → 8080). */}}
{{- define "lockstep.port" -}}
{{- regexFind "[0-9]+$" . | int }}
{{- end }}

{{- define "lockstep.httpPort" -}}
{{- include "lockstep.port" (required "config.LOCKSTEP_LISTEN is required" .Values.config.LOCKSTEP_LISTEN) }}
{{- end }}

{{/* The port serving /metrics: the metrics listener's, or the main one's. */}}
{{- define "lockstep.metricsPortName" -}}
{{- if .Values.config.LOCKSTEP_METRICS_LISTEN }}metrics{{ else }}http{{ end }}
{{- end }}

{{/* LOCKSTEP_DRAIN_TIMEOUT in whole seconds. */}}
{{- define "lockstep.drainSeconds" -}}
{{- $d := .Values.config.LOCKSTEP_DRAIN_TIMEOUT | default "10s" }}
{{- if not (regexMatch "^[0-9]+s$" $d) }}
{{- fail (printf "config.LOCKSTEP_DRAIN_TIMEOUT must be whole seconds like \"10s\" (got %q): the chart derives terminationGracePeriodSeconds from it" $d) }}
{{- end }}
{{- trimSuffix "s" $d | int }}
{{- end }}

{{/* Refuses settings the gateway would refuse at start-up, or that break a multi-pod install. */}}
{{- define "lockstep.validate" -}}
{{- $sources := 0 }}
{{- if .Values.secrets.LOCKSTEP_JWT_SECRET }}{{ $sources = add1 $sources }}{{ end }}
{{- if or .Values.jwtKeys.publicKeyPem .Values.config.LOCKSTEP_JWT_PUBLIC_KEY }}{{ $sources = add1 $sources }}{{ end }}
{{- if or .Values.jwtKeys.jwks .Values.config.LOCKSTEP_JWT_JWKS }}{{ $sources = add1 $sources }}{{ end }}
{{- if and .Values.jwtKeys.existingSecret (not (or .Values.jwtKeys.publicKeyPem .Values.jwtKeys.jwks)) }}{{ $sources = add1 $sources }}{{ end }}
{{- if gt $sources 1 }}
{{- fail "set only one JWT key source: secrets.LOCKSTEP_JWT_SECRET, jwtKeys.publicKeyPem / config.LOCKSTEP_JWT_PUBLIC_KEY, or jwtKeys.jwks / config.LOCKSTEP_JWT_JWKS" }}
{{- end }}
{{- if and (not .Values.existingSecret) (not .Values.secrets.LOCKSTEP_REDIS_URL) (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "more than one replica needs Redis: set secrets.LOCKSTEP_REDIS_URL (or existingSecret), or replicaCount=1 with autoscaling.enabled=false; nodes without Redis do not share locks" }}
{{- end }}
{{- end }}

{{/* True (non-empty) when no JWT key source is configured anywhere: the chart generates an HS256 secret. */}}
{{- define "lockstep.generateJwtSecret" -}}
{{- if not (or .Values.existingSecret .Values.secrets.LOCKSTEP_JWT_SECRET .Values.jwtKeys.publicKeyPem .Values.jwtKeys.jwks .Values.jwtKeys.existingSecret .Values.config.LOCKSTEP_JWT_PUBLIC_KEY .Values.config.LOCKSTEP_JWT_JWKS) }}true{{ end }}
{{- end }}

{{/* True (non-empty) when migrations can run: a database URL is (or may be) configured. */}}
{{- define "lockstep.hasDatabase" -}}
{{- if or .Values.secrets.LOCKSTEP_DATABASE_URL .Values.existingSecret }}true{{ end }}
{{- end }}

{{- define "flannel.labels" -}}
app: flannel
app.kubernetes.io/name: flannel
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flannel.netConf" -}}
{{- $conf := dict -}}
{{- if .Values.podCidr }}{{ $_ := set $conf "Network" .Values.podCidr }}{{ end -}}
{{- if .Values.podCidrv6 }}{{ $_ := set $conf "IPv6Network" .Values.podCidrv6 }}{{ $_ := set $conf "EnableIPv6" true }}{{ end -}}
{{- if not .Values.podCidr }}{{ $_ := set $conf "EnableIPv4" false }}{{ end -}}
{{- $_ := set $conf "Backend" .Values.backend -}}
{{- $conf = merge $conf .Values.netConf -}}
{{- toPrettyJson $conf -}}
{{- end }}

{{- define "flannel.cniConf" -}}
{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
{{- end }}

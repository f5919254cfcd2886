#!/usr/bin/env bash
# gen-tls.sh OUTDIR: a throwaway CA (ca.pem) and a leaf certificate (server.pem, server.key)
# for localhost, 127.0.0.1 and ::1, for the test directories (slapd, Samba).
# The leaf is CA:FALSE on purpose: rustls rejects a certificate with CA:TRUE presented as the
# server's end-entity certificate. Keys are mode 0600 (Samba refuses a world-readable key).
set -euo pipefail
out=${1:?usage: gen-tls.sh OUTDIR}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.pem -days 3650 -subj "/CN=ldap2scim test CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf '%s\n' "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature,keyEncipherment" \
  "extendedKeyUsage=serverAuth" \
  "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out server.pem -days 3650 -extfile server.ext 2>/dev/null
chmod 600 ca.key server.key
rm -f server.csr server.ext ca.srl

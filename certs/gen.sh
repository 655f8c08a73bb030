#!/usr/bin/env bash
# Regenerates the DEV/TEST-ONLY key material in this folder. Never use these keys in production.
#   ca.pem / ca.key          test CA that signs the leaf
#   server.pem / server.key  leaf for localhost, 127.0.0.1 and ::1 (regrelay's HTTPS in tests and the demo)
#   server-next.pem / .key   a second leaf for the same names (the certificate swapped in by the reload test)
#   token-signing.pem / .key RSA key + self-signed cert of the GitLab-behaving token service;
#                            the registry trusts it through `auth.token.rootcertbundle`
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=regrelay test CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout server.key -out server.csr
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" -out server.pem \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n')
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost (next)" \
  -keyout server-next.key -out server-next.csr
openssl x509 -req -in server-next.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" -out server-next.pem \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n')
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out token-signing.key
openssl req -x509 -key token-signing.key -nodes -days "$days" -subj "/CN=gitlab-issuer" -out token-signing.pem
rm -f server.csr server-next.csr ca.srl

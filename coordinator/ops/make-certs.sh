#!/bin/sh
# Makes a private CA and one certificate per identity with openssl, holding
# what the coordinator and the SDK require (SECURITY.md, "What a
# certificate must hold"): X.509 v3; the CA with basicConstraints CA:TRUE
# and keyCertSign; each leaf with its identity as a spiffe:// URI SAN and
# as CN, the DNS names and IPs it is reached at, and both TLS uses (a
# service is a client of the coordinator and the server of its phase 2).
# A test runs this very script (tests/tests/security.rs).
#
#   sh make-certs.sh DIR TRUST_DOMAIN IDENTITY...
#   sh make-certs.sh certs example.org tcc-coordinator shop orders ops
#
# Writes DIR/ca.pem, DIR/ca.key and DIR/IDENTITY.pem, DIR/IDENTITY.key.
# Each leaf also names DNS:IDENTITY, DNS:localhost and IP:127.0.0.1; add
# the names your services are reached at (SAN in the printf below).
set -eu
dir=$1
domain=$2
shift 2
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/CN=tcc CA" -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
for id in "$@"; do
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:spiffe://%s/%s,DNS:%s,DNS:localhost,IP:127.0.0.1\n' \
        "$domain" "$id" "$id" > "$id.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$id" -keyout "$id.key" -out "$id.csr"
    openssl x509 -req -in "$id.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 90 -extfile "$id.ext" -out "$id.pem"
    rm "$id.csr" "$id.ext"
done

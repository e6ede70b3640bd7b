#!/bin/sh
# Private CA and broker certificate for production.conf's TLS listeners.
#
#   make_ca.sh OUT_DIR BROKER_DNS_NAME [BROKER_IP]
#
# Writes OUT_DIR/ca.key, ca.crt (10 years; keep ca.key offline after this), broker.key and
# broker.crt (825 days, subjectAltName = the DNS name and the optional IP, which is what clients
# verify). Keys are ECDSA P-256: small, fast to verify on a Raspberry Pi, supported by TLS 1.2+.
# An existing ca.key/ca.crt in OUT_DIR is reused, so running it again only renews the broker
# certificate. Devices get ca.crt only.
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 OUT_DIR BROKER_DNS_NAME [BROKER_IP]" >&2
    exit 2
fi
out=$1
dns=$2
ip=${3:-}
san="DNS:${dns}"
[ -n "$ip" ] && san="${san},IP:${ip}"

mkdir -p "$out"
umask 077

if [ ! -f "$out/ca.key" ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$out/ca.key"
    openssl req -x509 -new -sha256 -days 3650 -key "$out/ca.key" -out "$out/ca.crt" \
        -subj "/CN=FedMask fleet CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
fi

openssl ecparam -name prime256v1 -genkey -noout -out "$out/broker.key"
openssl req -new -sha256 -key "$out/broker.key" -out "$out/broker.csr" -subj "/CN=${dns}"
ext="$out/broker.ext"
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$ext"
openssl x509 -req -sha256 -days 825 -in "$out/broker.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -CAcreateserial -out "$out/broker.crt" -extfile "$ext"
rm -f "$out/broker.csr" "$ext"
chmod 644 "$out/ca.crt" "$out/broker.crt"
echo "wrote $out/ca.crt, $out/broker.crt and $out/broker.key (SAN ${san})"

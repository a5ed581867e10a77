#!/usr/bin/env bash
# make-certs.sh DIR ETCD_IP: a CA, etcd's server certificate for ETCD_IP and a
# client certificate (no CommonName) for the sockgraft agents. Needs openssl.
set -euo pipefail
if [[ $# -ne 2 || $1 == -h || $1 == --help ]]; then
  echo "usage: $0 DIR ETCD_IP    e.g. $0 /etc/sockgraft/etcd 10.0.0.5" >&2
  exit 2
fi
dir=$1 ip=$2
mkdir -p "$dir" && chmod 700 "$dir" && cd "$dir"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.pem -days 825 -subj /CN=sockgraft-etcd-ca
printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$ip" > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
openssl req "${ec[@]}" -keyout server.key -out server.csr -subj /CN=sockgraft-etcd
openssl req "${ec[@]}" -keyout client.key -out client.csr -subj /O=sockgraft-agent
for n in server client; do
  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem \
    -days 825 -extfile $n.ext
done
rm -f ./*.csr ./*.ext ca.srl
chmod 600 ./*.key
echo "made $dir/{ca,server,client}.pem and their keys"

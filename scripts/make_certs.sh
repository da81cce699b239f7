#!/usr/bin/env bash
# Generate what a TLS deployment with SuperNode authentication needs:
#
#   OUT/ca.crt, OUT/ca.key                 a private certificate authority (keep ca.key offline)
#   OUT/superlink.crt, OUT/superlink.key   the SuperLink's server certificate, signed by the CA,
#                                          with SANs localhost, 127.0.0.1, ::1, superlink and
#                                          every --host you pass (the name or IP address that
#                                          remote SuperNodes and `flwr` use to reach it)
#   OUT/supernode-I, OUT/supernode-I.pub   one EC P-384 key pair per SuperNode, in OpenSSH
#                                          format (what Flower 1.41 reads); register each
#                                          .pub with `flwr supernode register`
#
#   scripts/make_certs.sh [--out DIR] [--host NAME_OR_IP]... [--nodes N] [--days D] [--force]
#
# Defaults: --out docker/certs, --nodes 3, --days 365. Existing files are kept (re-running
# adds missing node keys only) unless --force is given. Needs openssl, and ssh-keygen or a
# python3 with the `cryptography` package (any Flower environment has it).
#
# Modes: OUT itself 0755 and certificates and .pub files 0644, so that the containers' user
# (uid 49999) can enter OUT and read ca.crt, also when the whole folder is mounted (-v OUT:/certs);
# every private key (ca.key, superlink.key, supernode-N) 0600, readable by its owner only,
# whoever runs this. Run as root, this script gives superlink.key and the SuperNode keys to
# uid 49999 (still 0600). Run as another user, the keys stay yours and the script says how to
# hand them to the containers (docs/deployment.md, "TLS and SuperNode authentication"):
#   sudo chown 49999:49999 OUT/superlink.key OUT/supernode-0 ...
# ca.key is never given to that uid (in a mounted OUT it is there but unreadable); the compose
# files mount single files and leave it out. Keep it offline.
# Re-running also repairs these modes (e.g. an OUT made 0700 by an older version).
set -euo pipefail
umask 077  # nothing this script creates is readable by others until it says so below

out="docker/certs"
nodes=3
days=365
force=0
hosts=()
while (($#)); do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --host) hosts+=("$2"); shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;  # this header
        *) echo "make_certs.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "make_certs.sh: --nodes must be a number, got '$nodes'" >&2; exit 2; }

# Made traversable here (not by the umask above): the private keys inside stay 0600, and a
# folder the containers cannot enter breaks a mounted OUT ("--root-certificates does not
# point to a file"). Parents it creates get the usual 0755 too.
(umask 022 && mkdir -p "$out")
chmod 0755 "$out"
cd "$out"
if ((force)); then rm -f ca.crt ca.key ca.srl superlink.crt superlink.key superlink.csr supernode-*; fi

if [[ ! -f ca.key ]]; then
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" \
        -keyout ca.key -out ca.crt -subj "/CN=pFedMMA deployment CA" 2>/dev/null
    echo "created CA: $out/ca.crt"
fi

if [[ ! -f superlink.key ]]; then
    san="DNS:localhost,DNS:superlink,IP:127.0.0.1,IP:::1"
    for h in "${hosts[@]+"${hosts[@]}"}"; do
        if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
    done
    openssl req -newkey rsa:4096 -sha256 -nodes -keyout superlink.key -out superlink.csr \
        -subj "/CN=superlink" 2>/dev/null
    openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
        -days "$days" -out superlink.crt \
        -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n' "$san") \
        2>/dev/null
    rm -f superlink.csr
    echo "created SuperLink certificate: $out/superlink.crt ($san)"
elif ((${#hosts[@]})); then
    echo "superlink.key exists: --host ignored (use --force to re-issue the certificate)" >&2
fi

make_node_key() {  # $1 = key file; writes $1 (private, OpenSSH) and $1.pub
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$(basename "$1")" -f "$1"
    else
        python3 - "$1" <<'PY'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

key = ec.generate_private_key(ec.SECP384R1())
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                              serialization.NoEncryption()))
with open(path + ".pub", "wb") as f:
    f.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                          serialization.PublicFormat.OpenSSH) + b"\n")
PY
    fi
}

for ((i = 0; i < nodes; i++)); do
    if [[ ! -f "supernode-$i" ]]; then
        make_node_key "supernode-$i"
        echo "created SuperNode key pair: $out/supernode-$i (+ .pub)"
    fi
done

# The CA key never goes into a container: it stays private to whoever ran this script.
chmod 0600 ca.key
in_containers=(superlink.key)
for f in supernode-*; do [[ "$f" == *.pub ]] || in_containers+=("$f"); done
chmod 0600 "${in_containers[@]}"
chmod 0644 ca.crt superlink.crt supernode-*.pub
if [[ "$(id -u)" == 0 ]]; then
    chown 49999:49999 "${in_containers[@]}"
else
    echo "note: the private keys are mode 0600 and yours; the containers (uid 49999) need" \
        "superlink.key and the supernode-N keys: sudo chown 49999:49999 $(printf "$out/%s " "${in_containers[@]}")" >&2
fi
echo "done: $out"

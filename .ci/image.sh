#!/usr/bin/env bash
# CI proof of the container image (Dockerfile), called at the end of .ci/run, as root on Debian.
# No registry is reachable here, so: a bookworm base made with debootstrap and imported under
# the very name the runtime stage's FROM uses (the Dockerfile stays as users build it), and the
# `runtime-prebuilt` target with the binary CI already built. CI uses the debug build only to
# prove the image (its files, user, entrypoint and tools); release images come from the build
# stage (`docker build .` where a Rust image can be pulled).
# Then the image runs `ward version`, `ward proxy --check` on every example config of
# examples/ (mounted read-only), and `ward redirect install` / `remove` with both backends in
# the container's own network namespace (the host's rules are untouched).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

skip() {
  echo "=================================================================="
  echo "SKIPPED: container image: $*"
  echo "=================================================================="
  exit 0
}
fail() {
  echo "=================================================================="
  echo "FAILED: container image: $*" >&2
  echo "=================================================================="
  exit 1
}

[ "$(id -u)" = 0 ] || skip "not root (podman runs rootful here)"
bin=target/debug/ward
[ -x "$bin" ] || fail "$bin is missing: build it first (cargo build)"

export DEBIAN_FRONTEND=noninteractive
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null && python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
if [ ${#need[@]} -gt 0 ]; then
  timeout 600 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

work=$(mktemp -d /tmp/ward-image.XXXXXX)
base=docker.io/library/debian:bookworm-slim   # the runtime stage's FROM, exactly
image=localhost/ward-ci-image:$$
container=ward-ci-redirect-$$
made_base=no
cleanup() {
  set +e
  timeout 60 podman rm -f -t 0 --ignore "$container" >/dev/null 2>&1
  timeout 60 podman rmi -f "$image" >/dev/null 2>&1
  [ "$made_base" = yes ] && timeout 60 podman rmi -f "$base" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# The defaults fail on this host: crun with its cgroups, and container limits above the host's
# (EPERM). runc, cgroupfs, and limits the host allows.
cat > "$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
export CONTAINERS_CONF=$work/containers.conf
if ! info=$(timeout 60 podman info 2>&1); then
  echo "$info" | tail -5
  skip "podman cannot run on this machine (podman info failed)"
fi

# The base: a real image of that name is used as it is; else a minimal bookworm, removed at
# the end.
if ! podman image exists "$base"; then
  t=$SECONDS
  timeout 600 debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; fail "debootstrap of bookworm failed"; }
  made_base=yes
  tar -C "$work/rootfs" -c . | timeout 300 podman import -q - "$base" >/dev/null \
    || fail "podman import of the bookworm base failed"
  rm -rf "$work/rootfs"
  echo "image: base $base from debootstrap in $((SECONDS - t)) s"
fi

# The build context: the Dockerfile and .dockerignore unchanged, with the debug binary where
# --build-arg WARD_BINARY names it (a hard link, not the gigabytes of target/ walked by the
# build). The runtime stage's apt-get reaches Debian's mirror through the host's network.
t=$SECONDS
mkdir -p "$work/context/target/debug"
cp Dockerfile .dockerignore "$work/context/"
ln "$bin" "$work/context/target/debug/ward" 2>/dev/null || cp "$bin" "$work/context/target/debug/ward"
timeout 900 podman build -q --pull=never --network host --target runtime-prebuilt \
  --build-arg WARD_BINARY=target/debug/ward -t "$image" "$work/context" > "$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; fail "podman build --target runtime-prebuilt failed"; }
echo "image: built $image in $((SECONDS - t)) s ($(podman image inspect -f '{{.Size}}' "$image") bytes)"

run() { timeout 120 podman run --rm --network none "$@" < /dev/null; }

# Who the image runs as: the uid `ward redirect --proxy-uid` names, never root.
user=$(podman image inspect -f '{{.Config.User}}' "$image")
[ "$user" = "1337:1337" ] || fail "the image's user is '$user', not 1337:1337"

out=$(run "$image" version) || fail "ward version failed in the image"
echo "image: ward version: $out"
case "$out" in ward*) ;; *) fail "ward version printed '$out'" ;; esac

# The files the example configs read, at the paths they name (a server CA, a join token, and
# an X.509-SVID for inventory for the [tls] variant), readable by the image's user only.
files=$work/files
mkdir -p "$files/tls" "$files/server-ca" "$files/token" "$files/k8s"
(
  cd "$files"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj /CN=example-root -days 2 -out tls/roots.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out tls/key.pem
  openssl req -new -key tls/key.pem -subj /CN=inventory -out leaf.csr
  printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature \
    extendedKeyUsage=serverAuth,clientAuth \
    subjectAltName=URI:spiffe://ward.local/ns/default/svc/inventory > leaf.ext
  openssl x509 -req -in leaf.csr -CA tls/roots.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile leaf.ext -out tls/cert.pem 2>/dev/null
  rm -f ca.key leaf.csr leaf.ext tls/roots.srl
  cp tls/roots.pem server-ca/ca.pem
  echo "example-join-token-not-a-real-one" > token/token
  chown -R 1337:1337 tls token
  chmod 0400 tls/key.pem token/token
) || fail "cannot make the example certificates with openssl"
mounts=(
  -v "$PWD/examples:/examples:ro"
  -v "$files/tls:/etc/ward/tls:ro"
  -v "$files/server-ca:/etc/ward/server-ca:ro"
  -v "$files/server-ca/ca.pem:/etc/ward/server-ca.pem:ro"
  -v "$files/token:/run/secrets/ward:ro"
)

# Every config: the TOML files, and the one in each Kubernetes ConfigMap.
checked=0
check() { # $1: what it is; the rest: podman run arguments before the image
  local what=$1 out
  shift
  out=$(run "${mounts[@]}" "$@" 2>&1) || fail "ward proxy --check of $what in the image: $out"
  echo "image: $what: $out"
  checked=$((checked + 1))
}
while IFS= read -r toml; do
  check "$toml" "$image" proxy --check --config "/$toml"
done < <(find examples -name '*.toml' | sort)
while IFS= read -r yaml; do
  n=0
  while IFS= read -r name; do
    python3 - "$yaml" "$name" > "$files/k8s/$n.toml" <<'EOF' || fail "cannot read $yaml"
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == sys.argv[2]:
        sys.stdout.write(doc["data"]["ward.toml"])
EOF
    check "$yaml ConfigMap $name" -v "$files/k8s/$n.toml:/etc/ward/ward.toml:ro" \
      "$image" proxy --check --config /etc/ward/ward.toml
    n=$((n + 1))
  done < <(python3 -c '
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") == "ConfigMap" and "ward.toml" in doc.get("data", {}):
        print(doc["metadata"]["name"])' "$yaml")
done < <(find examples -name '*.yaml' | sort)
[ "$checked" -ge 3 ] || fail "only $checked example configs found under examples/"

# The redirect tools: install (twice: idempotent) and remove with each backend, as root with
# NET_ADMIN (as an init container runs it), in the container's own network namespace.
timeout 120 podman run -d --name "$container" --network none --user 0 --cap-add NET_ADMIN \
  --entrypoint sleep "$image" 300 > /dev/null || fail "cannot start the redirect container"
in_ctr() { timeout 60 podman exec "$container" "$@"; }
nat_rules() { in_ctr iptables-save -t nat | grep -v '^#'; in_ctr ip6tables-save -t nat | grep -v '^#'; }
# A rule of someone else's first: remove must leave it exactly as it was (and the nat tables
# exist before ward writes, so iptables-save prints the same before install and after remove).
in_ctr iptables -t nat -A OUTPUT -p tcp --dport 9 -j RETURN || fail "iptables failed in the image"
in_ctr ip6tables -t nat -A OUTPUT -p tcp --dport 9 -j RETURN || fail "ip6tables failed in the image"
before=$(nat_rules) || fail "iptables-save is missing or failed in the image"
for backend in iptables nftables; do
  for _ in 1 2; do
    out=$(in_ctr ward redirect install --proxy-uid 1337 --backend "$backend" 2>&1) \
      || fail "ward redirect install --backend $backend in the image: $out"
  done
  case $backend in
    iptables) [[ $(nat_rules) == *WARD_OUTBOUND* ]] || fail "no WARD_OUTBOUND chain after install" ;;
    nftables) in_ctr nft list table inet ward > /dev/null || fail "no table inet ward after install" ;;
  esac
  out=$(in_ctr ward redirect remove --backend "$backend" 2>&1) \
    || fail "ward redirect remove --backend $backend in the image: $out"
  [ "$(nat_rules)" = "$before" ] || fail "the nat table differs after remove --backend $backend"
  ! in_ctr nft list table inet ward > /dev/null 2>&1 || fail "table inet ward left after remove"
  echo "image: ward redirect install (twice) and remove --backend $backend: ok"
done

echo "image: ok in $((SECONDS - started)) s"

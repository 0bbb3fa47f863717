#!/usr/bin/env bash
# e2e/kind/node-image.sh: a kind node image built here, without a container registry.
#
#   e2e/kind/node-image.sh            print the node image's name, building what is missing first
#   e2e/kind/node-image.sh binaries   only the Go and C builds (the long part; start it early)
#   e2e/kind/node-image.sh rootfs     only the Debian root filesystem (debootstrap)
#   e2e/kind/node-image.sh kind       install the kind CLI from its Go module; print its path
#
# What kind's own `kind build node-image` assembles from pulled images and release tarballs is made
# from sources instead, following kind's images/base Dockerfile and pkg/build/nodeimage:
#   1. binaries: kubeadm, kubelet, kubectl, kube-apiserver, kube-controller-manager, kube-scheduler,
#      kube-proxy and etcd from the pinned Go module e2e/kind/node/k8s (the Kubernetes release of the
#      test bed); CoreDNS (e2e/kind/node/coredns) and crictl (e2e/kind/node/crictl) from their own
#      modules; pause from Kubernetes' build/pause/linux/pause.c with gcc -static. All static.
#   2. base image: a Debian root filesystem from debootstrap (systemd, containerd, runc, CNI plugins,
#      iptables, ...) plus kind's base files (entrypoint, units, containerd config) from the kind
#      module, imported with `docker import`.
#   3. component images: each binary in a FROM-scratch style image (`docker import` of a tarball),
#      tagged with the names kubeadm asks for, so that kubeadm and the kubelet pull nothing.
#   4. node image: the base image with kubeadm, kubelet, kubectl and the component images imported
#      into its containerd, committed (what kind's node-image builder does).
# Everything built is cached outside the clone in ~/.cache/sealed-ota/kind (SEALED_OTA_CACHE) and
# in Docker's image store; each step is skipped when its inputs (a hash of this script and the Go
# module files) have not changed.
#
# Deviations from kind's upstream images, all for building offline: Debian's containerd 1.6 and
# runc 1.1 instead of containerd 2.x and runc 1.3; no kindnetd (its Go module cannot be fetched
# here), so the node ships a static bridge CNI configuration and the cluster has one node; no
# local-path-provisioner (kind then installs its legacy host-path StorageClass; nothing here uses
# volumes); etcd is the version the Kubernetes module pins (3.6.4), tagged as such.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$REPO/e2e/kind"
K8S_VERSION=v1.34.4
ETCD_TAG=3.6.4-0
COREDNS_TAG=v1.12.1
PAUSE_TAG=3.10.1
CRICTL_VERSION=v1.34.0
KIND_VERSION=v0.30.0
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR="${SEALED_OTA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${SEALED_OTA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealed-ota}/kind"
BIN="$CACHE/k8s-$K8S_VERSION/bin"
NODE_IMAGE="${SEALED_OTA_KIND_NODE_TAG:-sealed-ota/kind-node:$K8S_VERSION}"
BASE_IMAGE="sealed-ota/kind-base:$DEBIAN_SUITE"
LABEL=dev.sealed-ota.inputs

log() { echo "node-image: $*" >&2; }
die() { echo "node-image: error: $*" >&2; exit 1; }

DOCKER="$("$REPO/scripts/docker.sh" cli)" || die "no docker client (scripts/docker.sh up first)"
docker() { "$DOCKER" "$@"; }

# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
SELF="${BASH_SOURCE[0]}"

gomodcache() { go env GOMODCACHE; }

# --- 1. binaries ---------------------------------------------------------------------------------
K8S_BINS=(kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd)

build_binaries() {
  command -v go >/dev/null || die "go is needed to build the Kubernetes binaries"
  command -v gcc >/dev/null || die "gcc is needed to build pause"
  local node="$HERE/node" stamp want
  want=$(inputs_hash "$SELF" "$node"/k8s/go.mod "$node"/k8s/go.sum "$node"/coredns/go.sum "$node"/crictl/go.sum)
  stamp="$BIN/.inputs"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.binaries.lock"
  flock 8
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exec 8>&-; return; fi
  local out="$BIN.tmp" ld="-s -w" p t0=$SECONDS
  mkdir -p "$out"
  # kubeadm refuses to run without a release version; the other commands report it.
  local minor
  minor=$(cut -d. -f2 <<<"$K8S_VERSION")
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld="$ld -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=2026-01-01T00:00:00Z"
  done
  log "building ${K8S_BINS[*]} $K8S_VERSION from Go modules (first run only: ~30 min on 2 cores)"
  local pkgs=()
  for p in "${K8S_BINS[@]}"; do [[ "$p" == etcd ]] || pkgs+=("k8s.io/kubernetes/cmd/$p"); done
  (cd "$node/k8s" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "$ld" -o "$out/" \
    "${pkgs[@]}" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
  log "building CoreDNS and crictl"
  (cd "$node/coredns" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$out/coredns" .)
  (cd "$node/crictl" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" -o "$out/crictl" sigs.k8s.io/cri-tools/cmd/crictl)
  log "building pause $PAUSE_TAG"
  (cd "$node/k8s" && gcc -Os -static -DVERSION="$PAUSE_TAG" -o "$out/pause" \
    "$(gomodcache)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c" && strip "$out/pause")
  rm -rf "$BIN"
  mv "$out" "$BIN"
  echo "$want" >"$stamp"
  log "binaries built in $((SECONDS - t0)) s"
  exec 8>&-
}

install_kind() {
  local bin="$CACHE/bin/kind"
  if [[ -x "$bin" ]] && "$bin" version 2>/dev/null | grep -q "kind $KIND_VERSION "; then echo "$bin"; return; fi
  log "installing kind $KIND_VERSION from its Go module"
  GOBIN="$CACHE/bin" go install "sigs.k8s.io/kind@$KIND_VERSION" >&2
  echo "$bin"
}

kind_files() { echo "$(gomodcache)/sigs.k8s.io/kind@$KIND_VERSION/images/base/files"; }

# --- 2. base image -------------------------------------------------------------------------------
BASE_PACKAGES=systemd,systemd-sysv,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins,socat,ebtables

build_rootfs() { # dir
  local r=$1
  [[ -x "$r/usr/bin/containerd" ]] && return
  apt_install debootstrap
  log "debootstrap $DEBIAN_SUITE into $r (first run only, a few minutes)"
  rm -rf "$r.tmp"
  sudo_ debootstrap --variant=minbase --include="$BASE_PACKAGES" "$DEBIAN_SUITE" "$r.tmp" "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
  rm -rf "$r"
  mv "$r.tmp" "$r"
}

# kind's base files and settings on top of the Debian root filesystem (images/base/Dockerfile).
configure_base() { # rootfs (a scratch copy)
  local r=$1 f
  f=$(kind_files)
  install -m 0755 "$f"/usr/local/bin/* "$r/usr/local/bin/"
  mkdir -p "$r/kind/bin" "$r/etc/containerd" "$r/etc/default" "$r/etc/sysctl.d" "$r/etc/systemd/system/kubelet.service.d" "$r/LICENSES"
  install -m 0644 "$f/kind/README.txt" "$r/kind/"
  install -m 0755 "$f"/kind/bin/* "$r/kind/bin/"
  install -m 0644 "$f/etc/crictl.yaml" "$r/etc/"
  install -m 0644 "$f"/etc/default/* "$r/etc/default/"
  install -m 0644 "$f"/etc/sysctl.d/* "$r/etc/sysctl.d/"
  install -m 0644 "$f"/etc/systemd/system/*.service "$f"/etc/systemd/system/*.slice "$r/etc/systemd/system/"
  install -m 0644 "$f"/etc/systemd/system/kubelet.service.d/* "$r/etc/systemd/system/kubelet.service.d/"
  rm -f "$r/etc/systemd/system/containerd-fuse-overlayfs.service"
  # kind's containerd configuration minus the fuse-overlayfs proxy plugin (not packaged in Debian),
  # with kubeadm's pause version. restrict_oom_score_adj: without CAP_SYS_RESOURCE (see
  # e2e/kind/shim) nothing may set an oom_score_adj below containerd's own.
  sed -e '/^\[proxy_plugins\]/,/^  address = /d' \
    -e "s#registry.k8s.io/pause:[0-9.]*\"#registry.k8s.io/pause:$PAUSE_TAG\"#" \
    -e 's#restrict_oom_score_adj = false#restrict_oom_score_adj = true#' \
    "$f/etc/containerd/config.toml" >"$r/etc/containerd/config.toml"
  grep -q "registry.k8s.io/pause:$PAUSE_TAG\"" "$r/etc/containerd/config.toml" || die "kind's containerd config changed: no pause image line"
  # Without --privileged (e2e/kind/shim) Docker mounts the cgroup hierarchies read-only; make them
  # writable before kind's entrypoint sets the node up. A privileged node has them writable already.
  python3 - "$r/usr/local/bin/entrypoint" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
hook = '''
# sealed-ota: started without --privileged, Docker mounts the cgroup hierarchies read-only
for m in $(findmnt -rn -o TARGET | grep -E '^/sys/fs/cgroup'); do mount -o remount,bind,rw "$m" || true; done
'''
anchor = '# validate state\nvalidate_userns'
if 'sealed-ota:' not in text:
    if anchor not in text:
        sys.exit("kind's entrypoint changed: no '# validate state' anchor")
    text = text.replace(anchor, hook + '\n' + anchor, 1)
open(path, 'w').write(text)
PY
  # Debian installs these where kind's Dockerfile does not.
  ln -sf /usr/bin/containerd "$r/usr/local/bin/containerd"
  ln -sf /usr/bin/containerd-shim-runc-v2 "$r/usr/local/bin/containerd-shim-runc-v2"
  mkdir -p "$r/opt/cni" && rm -rf "$r/opt/cni/bin" && ln -s /usr/lib/cni "$r/opt/cni/bin"
  install -m 0755 "$BIN/crictl" "$r/usr/local/bin/crictl"
  # kindnetd cannot be built here: one node, one static bridge network for its pods (the node's
  # pod CIDR, which kubeadm gives the first node out of kind's default 10.244.0.0/16).
  mkdir -p "$r/etc/cni/net.d"
  cat >"$r/etc/cni/net.d/10-bridge.conflist" <<'JSON'
{"cniVersion": "0.4.0", "name": "kind-bridge", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
  # The OCI runtime spec containerd starts from, with kind's product_uuid hook.
  sudo_ chroot "$r" ctr oci spec |
    jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' |
    jq 'del(.process.rlimits)' >"$r/etc/containerd/cri-base.json"
  find "$r/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
  rm -f "$r"/lib/systemd/system/multi-user.target.wants/* "$r"/etc/systemd/system/*.wants/* \
    "$r"/lib/systemd/system/local-fs.target.wants/* "$r"/lib/systemd/system/sockets.target.wants/*udev* \
    "$r"/lib/systemd/system/sockets.target.wants/*initctl* "$r"/lib/systemd/system/basic.target.wants/*
  grep -q '^ReadKMsg=no' "$r/etc/systemd/journald.conf" || echo "ReadKMsg=no" >>"$r/etc/systemd/journald.conf"
  ln -sf /lib/systemd/systemd "$r/sbin/init"
  sudo_ chroot "$r" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
  sudo_ chroot "$r" systemctl mask systemd-binfmt.service >/dev/null 2>&1
  mkdir -p "$r/etc/kubernetes/manifests"
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/var/log/*.log
  : >"$r/etc/machine-id"
}

build_base_image() {
  local want rootfs="$CACHE/rootfs-$DEBIAN_SUITE" work
  want=$(inputs_hash "$SELF")
  [[ "$(image_label "$BASE_IMAGE")" == "$want" ]] && return
  build_rootfs "$rootfs"
  log "base image $BASE_IMAGE"
  work=$(mktemp -d "$CACHE/base.XXXXXX")
  # shellcheck disable=SC2064 # expand now: the trap must remove this directory
  trap "sudo_ rm -rf '$work'" RETURN
  cp -a "$rootfs/." "$work/"
  configure_base "$work"
  # `docker import --change` cannot set STOPSIGNAL on Docker 20.10: a one-line build adds it
  # (FROM a local image: nothing is pulled).
  tar -C "$work" --numeric-owner -cf - . |
    docker import --change 'ENV container=docker' \
      --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' - "$BASE_IMAGE-unsignalled" >/dev/null
  printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\nLABEL %s=%s\n' "$BASE_IMAGE-unsignalled" "$LABEL" "$want" |
    DOCKER_BUILDKIT=0 docker build -q -t "$BASE_IMAGE" - >/dev/null
  docker rmi "$BASE_IMAGE-unsignalled" >/dev/null
}

# --- 3. component images -------------------------------------------------------------------------
skeleton() { # dir
  local d=$1
  mkdir -p "$d/usr/local/bin" "$d/etc" "$d/tmp" "$d/var/run" "$d/root"
  chmod 1777 "$d/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n' >"$d/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$d/etc/group"
  echo 'hosts: files dns' >"$d/etc/nsswitch.conf"
}

# An image from a directory: `docker import` of its tarball.
import_image() { # dir ref docker-import-change...
  local d=$1 ref=$2; shift 2
  tar -C "$d" --numeric-owner --owner=0 --group=0 -cf - . |
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$@" - "$ref" >/dev/null
}

build_component_images() { # out-dir for image tarballs
  local out=$1 w c rootfs="$CACHE/rootfs-$DEBIAN_SUITE" bb
  w=$(mktemp -d "$CACHE/images.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$w'" RETURN
  mkdir -p "$out"
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    skeleton "$w/$c"; cp "$BIN/$c" "$w/$c/usr/local/bin/"
    import_image "$w/$c" "registry.k8s.io/$c:$K8S_VERSION" --change "ENTRYPOINT [\"/usr/local/bin/$c\"]"
  done
  skeleton "$w/etcd"; cp "$BIN/etcd" "$w/etcd/usr/local/bin/"; mkdir -p "$w/etcd/var/lib/etcd"
  import_image "$w/etcd" "registry.k8s.io/etcd:$ETCD_TAG" --change 'ENTRYPOINT ["/usr/local/bin/etcd"]'
  skeleton "$w/coredns"; cp "$BIN/coredns" "$w/coredns/coredns"
  cp -L "$rootfs/etc/ssl/certs/ca-certificates.crt" "$w/coredns/etc/" 2>/dev/null || true
  import_image "$w/coredns" "registry.k8s.io/coredns/coredns:$COREDNS_TAG" --change 'ENTRYPOINT ["/coredns"]'
  skeleton "$w/pause"; cp "$BIN/pause" "$w/pause/pause"
  import_image "$w/pause" "registry.k8s.io/pause:$PAUSE_TAG" --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535'
  # kube-proxy programs iptables: the xtables and conntrack tools with their libraries from the
  # Debian root filesystem, and (as upstream's distroless-iptables image does) a wrapper that picks
  # the legacy or nft backend the node uses; Debian's busybox-static runs the wrapper.
  local d="$w/kube-proxy" f l
  skeleton "$d"; cp "$BIN/kube-proxy" "$d/usr/local/bin/"
  for f in /usr/sbin/xtables-nft-multi /usr/sbin/xtables-legacy-multi /usr/sbin/conntrack; do
    mkdir -p "$d$(dirname "$f")"; cp -a "$rootfs$f" "$d$f"
    for l in $(sudo_ chroot "$rootfs" ldd "$f" | grep -o '/[^ ]*'); do mkdir -p "$d$(dirname "$l")"; cp -L "$rootfs$l" "$d$l"; done
  done
  mkdir -p "$d/usr/lib/x86_64-linux-gnu"; cp -a "$rootfs/usr/lib/x86_64-linux-gnu/xtables" "$d/usr/lib/x86_64-linux-gnu/"
  for f in "$rootfs"/usr/lib/x86_64-linux-gnu/xtables/*.so; do
    for l in $(sudo_ chroot "$rootfs" ldd "${f#"$rootfs"}" | grep -o '/[^ ]*'); do
      [[ -e "$d$l" ]] || { mkdir -p "$d$(dirname "$l")"; cp -L "$rootfs$l" "$d$l"; }
    done
  done
  bb="$w/busybox-static"; dpkg-deb -x "$(deb_file "$CACHE/debs" busybox-static)" "$bb"
  mkdir -p "$d/bin"; cp "$bb/bin/busybox" "$d/bin/busybox"
  for f in sh grep ln; do ln -sf busybox "$d/bin/$f"; done
  cat >"$d/usr/sbin/iptables-wrapper" <<'SH'
#!/bin/sh
# Picks the iptables backend the node's kubelet uses (its canary chains), then execs the real tool.
if iptables-nft-save -t mangle 2>/dev/null | grep -qE '^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)'; then mode=nft
elif iptables-legacy-save -t mangle 2>/dev/null | grep -qE '^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)'; then mode=legacy
else
  l=$( (iptables-legacy-save; ip6tables-legacy-save) 2>/dev/null | grep -c '^-')
  n=$( (iptables-nft-save; ip6tables-nft-save) 2>/dev/null | grep -c '^-')
  if [ "$l" -gt "$n" ]; then mode=legacy; else mode=nft; fi
fi
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf "xtables-$mode-multi" "/usr/sbin/$t"
done
exec "$0" "$@"
SH
  chmod 0755 "$d/usr/sbin/iptables-wrapper"
  for f in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf iptables-wrapper "$d/usr/sbin/$f"
    ln -sf xtables-nft-multi "$d/usr/sbin/${f/tables/tables-nft}"
    ln -sf xtables-legacy-multi "$d/usr/sbin/${f/tables/tables-legacy}"
  done
  cp -a "$rootfs/etc/protocols" "$rootfs/etc/ethertypes" "$d/etc/" 2>/dev/null || true
  import_image "$d" "registry.k8s.io/kube-proxy:$K8S_VERSION" --change 'ENTRYPOINT ["/usr/local/bin/kube-proxy"]'
  local images=(
    "registry.k8s.io/kube-apiserver:$K8S_VERSION" "registry.k8s.io/kube-controller-manager:$K8S_VERSION"
    "registry.k8s.io/kube-scheduler:$K8S_VERSION" "registry.k8s.io/kube-proxy:$K8S_VERSION"
    "registry.k8s.io/etcd:$ETCD_TAG" "registry.k8s.io/coredns/coredns:$COREDNS_TAG" "registry.k8s.io/pause:$PAUSE_TAG"
  )
  docker save -o "$out/images.tar" "${images[@]}"
  # They live on in the node image's containerd; Docker's copies are not needed.
  docker rmi "${images[@]}" >/dev/null
}

# --- 4. node image -------------------------------------------------------------------------------
build_node_image() {
  local want c work
  want=$(inputs_hash "$SELF" "$BIN/.inputs")
  if [[ "$(image_label "$NODE_IMAGE")" == "$want" ]]; then return; fi
  build_base_image
  log "node image $NODE_IMAGE"
  work=$(mktemp -d "$CACHE/node.XXXXXX")
  c="sealed-ota-node-build-$$"
  # shellcheck disable=SC2064
  trap "docker rm -f -v '$c' >/dev/null 2>&1 || true; rm -rf '$work'" RETURN
  build_component_images "$work"
  docker run -d --name "$c" --security-opt seccomp=unconfined --entrypoint=sleep "$BASE_IMAGE" infinity >/dev/null
  local b
  for b in kubeadm kubelet kubectl; do
    docker cp "$BIN/$b" "$c:/usr/bin/$b"
    docker exec "$c" chown root:root "/usr/bin/$b"
    docker exec "$c" chmod 0755 "/usr/bin/$b"
  done
  docker exec "$c" sh -c "echo -n $K8S_VERSION > /kind/version"
  # The images go into the node's containerd (namespace k8s.io), as kind's builder does.
  docker exec "$c" sh -c 'containerd >/tmp/containerd.log 2>&1 &'
  docker exec "$c" sh -c 'for i in $(seq 1 50); do [ -S /run/containerd/containerd.sock ] && exit 0; sleep 0.2; done; exit 1' ||
    die "containerd did not start in the build container"
  docker exec -i "$c" ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests - <"$work/images.tar" >/dev/null
  docker exec "$c" pkill containerd || true
  docker exec "$c" sh -c 'for i in $(seq 1 50); do pgrep -x containerd >/dev/null || exit 0; sleep 0.2; done; exit 1' || true
  docker exec "$c" rm -rf /tmp/containerd.log /run/containerd
  docker commit \
    --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    --change 'ENV HTTP_PROXY="" HTTPS_PROXY="" NO_PROXY=""' \
    --change "LABEL $LABEL=$want" \
    "$c" "$NODE_IMAGE" >/dev/null
}

case "${1:-image}" in
  binaries) build_binaries ;;
  rootfs) mkdir -p "$CACHE" && build_rootfs "$CACHE/rootfs-$DEBIAN_SUITE" ;;
  kind) install_kind ;;
  image)
    build_binaries
    build_node_image
    echo "$NODE_IMAGE"
    ;;
  *) echo "usage: e2e/kind/node-image.sh [image|binaries|rootfs|kind]" >&2; exit 2 ;;
esac

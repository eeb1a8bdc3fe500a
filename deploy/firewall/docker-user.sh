#!/usr/bin/env bash
# Deny the fetcher network the host and private address ranges (defence in depth below the
# fetcher's own address checks; see docs/sandbox.md and docs/deploy.md).
#
# Docker's bridge and --internal networks do not stop a container from reaching listeners on the
# host's own addresses, nor private networks routed from the host. This puts one chain,
# SAFEURL-FETCH, in front of DOCKER-USER (forwarded traffic) and INPUT (traffic to the host
# itself) for packets entering from the fetcher bridge, and lets only new connections to public
# addresses through.
#
#   deploy/firewall/docker-user.sh apply     # idempotent: rebuilds the chain, one jump each
#   deploy/firewall/docker-user.sh remove    # removes the jumps and the chain
#   deploy/firewall/docker-user.sh print     # prints the iptables commands, changes nothing
#
#   SAFEURL_FETCH_BRIDGE  bridge interface of the fetch network (default br-safeurl; compose.yaml
#                         and the `docker network create` in docs/sandbox.md set this name)
#   SAFEURL_FETCH_IPV6    1 to apply the IPv6 rules too (default: if ip6tables exists)
#
# Run it after dockerd has started (dockerd creates DOCKER-USER; if it is missing it is created
# here and jumped to from FORWARD), and again after a firewall reload. iptables rules do not
# survive a reboot by themselves: run this from a systemd unit ordered After=docker.service.
set -euo pipefail

BRIDGE=${SAFEURL_FETCH_BRIDGE:-br-safeurl}
CHAIN=SAFEURL-FETCH
MODE=${1:-apply}

V4_DENY=(0.0.0.0/8 10.0.0.0/8 100.64.0.0/10 127.0.0.0/8 169.254.0.0/16 172.16.0.0/12
         192.0.0.0/24 192.168.0.0/16 198.18.0.0/15 224.0.0.0/4 240.0.0.0/4)
V6_DENY=(::1/128 ::/128 ::ffff:0:0/96 64:ff9b:1::/48 fc00::/7 fe80::/10 ff00::/8)

run() {
  if [ "$MODE" = print ]; then printf '%s\n' "$*"; else "$@"; fi
}

exists() {  # tool args... : true if the rule/chain exists (never in print mode)
  [ "$MODE" != print ] && "$@" >/dev/null 2>&1
}

build_chain() {  # tool, deny ranges...
  local ipt=$1; shift
  exists "$ipt" -w -n -L "$CHAIN" || run "$ipt" -w -N "$CHAIN"
  run "$ipt" -w -F "$CHAIN"
  # Replies to connections the fetcher opened, and its DNS via Docker's embedded resolver
  # (which runs inside the container's namespace and never crosses this chain), pass.
  run "$ipt" -w -A "$CHAIN" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
  local net
  for net in "$@"; do
    run "$ipt" -w -A "$CHAIN" -d "$net" -j DROP
  done
  run "$ipt" -w -A "$CHAIN" -j RETURN
}

hook() {  # tool
  local ipt=$1
  if ! exists "$ipt" -w -n -L DOCKER-USER; then
    run "$ipt" -w -N DOCKER-USER
    exists "$ipt" -w -C FORWARD -j DOCKER-USER || run "$ipt" -w -I FORWARD 1 -j DOCKER-USER
  fi
  exists "$ipt" -w -C DOCKER-USER -i "$BRIDGE" -j "$CHAIN" ||
    run "$ipt" -w -I DOCKER-USER 1 -i "$BRIDGE" -j "$CHAIN"
  # The host itself (docker0/bridge gateway address, and every other host address): nothing.
  exists "$ipt" -w -C INPUT -i "$BRIDGE" -j DROP ||
    run "$ipt" -w -I INPUT 1 -i "$BRIDGE" -j DROP
}

unhook() {  # tool
  local ipt=$1
  while exists "$ipt" -w -C DOCKER-USER -i "$BRIDGE" -j "$CHAIN"; do
    run "$ipt" -w -D DOCKER-USER -i "$BRIDGE" -j "$CHAIN"; done
  while exists "$ipt" -w -C INPUT -i "$BRIDGE" -j DROP; do
    run "$ipt" -w -D INPUT -i "$BRIDGE" -j DROP; done
  if exists "$ipt" -w -n -L "$CHAIN"; then
    run "$ipt" -w -F "$CHAIN"
    run "$ipt" -w -X "$CHAIN"
  fi
}

want_v6() {
  case "${SAFEURL_FETCH_IPV6:-auto}" in
    1|yes|true) return 0 ;;
    0|no|false) return 1 ;;
    *) command -v ip6tables >/dev/null 2>&1 ;;
  esac
}

case "$MODE" in
  apply|print)
    build_chain iptables "${V4_DENY[@]}"; hook iptables
    if want_v6; then build_chain ip6tables "${V6_DENY[@]}"; hook ip6tables; fi
    ;;
  remove)
    unhook iptables
    if want_v6; then unhook ip6tables; fi
    ;;
  *) echo "usage: $0 [apply|remove|print]" >&2; exit 2 ;;
esac

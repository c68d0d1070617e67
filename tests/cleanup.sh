#!/bin/sh
# Remove what simulated-host tests (vrouter-tests harness) may have left behind:
# every network namespace named <prefix>-* (after SIGKILLing the processes inside it)
# and every link named <prefix>-* in the current namespace.
# Usage: tests/cleanup.sh [prefix]   (default: $VROUTER_TEST_PREFIX or "vrt")
# Prints what it removed; exits 0 unless something could not be removed.
set -u
p="${1:-${VROUTER_TEST_PREFIX:-vrt}}"
case "$p" in
  ''|*[!A-Za-z0-9]*) echo "cleanup.sh: bad prefix '$p'" >&2; exit 2 ;;
esac
rc=0
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$p-"); do
  i=0
  while [ $i -lt 20 ]; do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -z "$pids" ] && break
    kill -9 $pids 2>/dev/null
    sleep 0.05
    i=$((i + 1))
  done
  if ip netns del "$ns"; then echo "removed netns $ns"; else rc=1; fi
done
for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$p-"); do
  ip link show "$l" >/dev/null 2>&1 || continue  # a veth peer goes with its pair
  if ip link del "$l"; then echo "removed link $l"; else rc=1; fi
done
# ---- Docker end-to-end tests (tests/src/docker.rs) -----------------------------------
# Containers carry the label com.docker-vrouter.test=<prefix>; compose projects, and so
# their networks (<prefix><stack>_stack, or _default), are named with the prefix; the
# images are tagged docker-vrouter/*:<prefix>-test; state (shared and private) and config
# under /run/<prefix>-docker-*.
# Steering rules of the project (protocol 118) whose bridge is gone ("detached") are
# garbage of a stopped discovery.
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  for c in $(docker ps -aq --filter "label=com.docker-vrouter.test=$p"); do
    if docker rm -f "$c" >/dev/null; then echo "removed container $c"; else rc=1; fi
  done
  for n in $(docker network ls --format '{{.Name}}' | grep -E "^$p[a-z0-9]*_(stack|default)\$"); do
    if docker network rm "$n" >/dev/null; then echo "removed network $n"; else rc=1; fi
  done
  for i in discovery router testsvc; do
    if docker image inspect "docker-vrouter/$i:$p-test" >/dev/null 2>&1; then
      docker rmi -f "docker-vrouter/$i:$p-test" >/dev/null && echo "removed image docker-vrouter/$i:$p-test"
    fi
  done
fi
ip -4 rule show 2>/dev/null | grep 'proto 118' | grep '\[detached\]' | while read -r pref _ _ _ iif _ _ table _; do
  pref=${pref%:}
  ip -4 rule del pref "$pref" iif "$iif" table "$table" && echo "removed detached rule $pref iif $iif"
done
# The Docker tests' discovery steers in the host namespace's table netdev <prefix>vrouter
# and, with encryption `require`, drops stray VXLAN in table ip <prefix>vrouter
# (simulated hosts' tables go with their namespaces). Its WireGuard device is
# <prefix>-wg, removed with the other <prefix>-* links above.
for fam in netdev ip; do
  if command -v nft >/dev/null 2>&1 && nft list table "$fam" "${p}vrouter" >/dev/null 2>&1; then
    if nft delete table "$fam" "${p}vrouter"; then echo "removed table $fam ${p}vrouter"; else rc=1; fi
  fi
done
rm -rf /run/"$p"-docker-conf* 2>/dev/null
# --------------------------------------------------------------------------------------
left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$p-")
[ -n "$left" ] && { echo "cleanup.sh: still present: $left" >&2; rc=1; }
exit $rc

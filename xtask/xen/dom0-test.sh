#!/bin/sh
# colo xen-test, run inside dom0 as /root/test.sh: creates two PVH guests of the same shape,
# runs colo-xen-check (selftest, verified replication) and, if present, the conformance suite,
# then destroys the primary and checks the secondary goes on from the replicated state.
# Prints "XEN-TEST-STAGE <name> <seconds>" per stage and one "XEN-TEST-RESULT: PASS|FAIL ..." line.
CHECKPOINTS=${CHECKPOINTS:-20}
INTERVAL_MS=${INTERVAL_MS:-500}
LOG=/var/log/xen
now() { cut -d' ' -f1 /proc/uptime; }
T0=$(now)
stage_t=$T0
stage() { t=$(now); echo "XEN-TEST-STAGE $1 $(awk -v a="$stage_t" -v b="$t" 'BEGIN{printf "%.1f", b-a}')"; stage_t=$t; }
fail() {
  echo "XEN-TEST-RESULT: FAIL $*"
  for n in colo-a colo-b; do
    [ -f $LOG/guest-$n.log ] && { echo "--- tail of $n console"; tail -5 $LOG/guest-$n.log; }
  done
  xl list 2>&1
  exit 1
}
# wait_for FILE PATTERN SECONDS
wait_for() {
  i=0
  while ! grep -q "$2" "$1" 2>/dev/null; do
    sleep 1; i=$((i + 1))
    [ $i -ge "$3" ] && return 1
  done
  return 0
}

mkguest() {
  sed "s/NAME/$1/" /root/guest.cfg > /root/$1.cfg
  xl create /root/$1.cfg >/dev/null 2>&1 || fail "xl create $1"
  echo "DOM0: xl create $1 returned at uptime $(now)"
}
waitguest() {
  wait_for $LOG/guest-$1.log "GUEST UP" 150 || fail "$1 did not boot within 150 s"
  echo "DOM0: $1 up at uptime $(now)"
  wait_for $LOG/guest-$1.log "GUEST TICK" 60 || fail "$1 did not tick within 60 s"
}

colo --help >/dev/null 2>&1 || fail "the xen-enabled colo binary does not run in dom0"
xl info | grep -E "^(xen_version|virt_caps)"
# Both guests boot at once: the same kernel, initramfs and configuration, so the secondary's
# Xen-side state (event channels, vCPU info areas, timers) is set up like the primary's.
mkguest colo-a
mkguest colo-b
A=$(xl domid colo-a)
B=$(xl domid colo-b)
waitguest colo-a
waitguest colo-b
stage guests-boot

colo-xen-check selftest --domid "$A" || fail "colo-xen-check selftest on domain $A"
stage selftest

if command -v colo-xen-conformance >/dev/null 2>&1; then
  colo-xen-conformance --domid "$A" || fail "conformance suite on domain $A"
  stage conformance
fi

colo-xen-check replicate --primary "$A" --secondary "$B" --checkpoints "$CHECKPOINTS" \
  --interval-ms "$INTERVAL_MS" --leave-paused > /tmp/replicate.out 2>&1
rc=$?
cat /tmp/replicate.out
[ $rc -eq 0 ] || fail "replication of $A onto $B"
stage replicate

# Takeover: both are paused at the last verified checkpoint. Destroy the primary, unpause the
# secondary, and expect it to print the primary's boot id with the next tick numbers.
last=$(grep "GUEST TICK" $LOG/guest-colo-a.log | tail -1)
id=$(echo "$last" | awk '{print $3}')
n=$(echo "$last" | awk '{print $4}')
[ -n "$id" ] && [ -n "$n" ] || fail "no tick in the primary's console"
before=$(wc -l < $LOG/guest-colo-b.log)
# A console keystroke for the secondary: Xen keeps a PVH guest's one-shot timer and part of
# its event-channel state outside guest memory and the HVM context, so the copied kernel may
# wait for a timer event the secondary's Xen never armed. Any event that wakes it makes the
# kernel leave idle and re-arm its tick. (Input on hvc0 that nobody reads is discarded.)
kick() {
  tty=$(xenstore-read /local/domain/$B/console/tty 2>/dev/null)
  [ -n "$tty" ] && printf '\n' > "$tty"
}
xl destroy colo-a || fail "xl destroy colo-a"
xl unpause colo-b || fail "xl unpause colo-b"
kick
want=3
i=0
got=""
while [ $i -lt 60 ]; do
  sleep 1; i=$((i + 1))
  [ $((i % 5)) -eq 0 ] && kick
  got=$(tail -n +$((before + 1)) $LOG/guest-colo-b.log | grep "GUEST TICK $id" | awk -v n="$n" '$4 > n' | wc -l)
  [ "$got" -ge $want ] && break
done
echo "--- secondary console after takeover (primary's last tick: $id $n)"
tail -n +$((before + 1)) $LOG/guest-colo-b.log | tail -8
other=$(tail -n +$((before + 1)) $LOG/guest-colo-b.log | grep "GUEST TICK" | grep -vc "GUEST TICK $id")
[ "$got" -ge $want ] || fail "takeover: the secondary printed $got ticks of boot $id after $n within 60 s"
[ "$other" -eq 0 ] || fail "takeover: the secondary printed $other ticks of another boot"
first=$(tail -n +$((before + 1)) $LOG/guest-colo-b.log | grep "GUEST TICK $id" | awk -v n="$n" '$4 > n {print $4; exit}')
stage takeover
summary=$(grep "check: OK replicate" /tmp/replicate.out | sed 's/check: OK replicate //')
echo "XEN-TEST-RESULT: PASS $summary; takeover: secondary went on from tick $n to $first and $got ticks of boot $id in ${i}s; total $(awk -v a="$T0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s in dom0"

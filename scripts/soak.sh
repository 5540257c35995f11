#!/usr/bin/env bash
# make soak: mixed policy and milter load against policyd on a private
# Redis for SOAK_DURATION (default 10m); Redis is stopped at 40 % of the
# run and started again at 50 %; hostile milter clients flood headers
# (70-78 %) and macros (80-88 %) beside the load. Reports policyd's RSS,
# goroutines and open descriptors at the start, the middle, under each
# flood and at the end, and whether they stayed flat.
#
# Flat means: at the end, and in the middle, each figure is at most
# 20 % above its value at the start, plus a small allowance for what is in
# flight at the moment of a sample (16 MiB of RSS: a GC cycle's worth of
# garbage; 2×(policy + milter concurrency) goroutines and descriptors: the
# milter sessions opening and closing all the time, each a goroutine and a
# socket). A leak of one goroutine or descriptor per session, or of memory
# per client, grows far past that within minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

dur=${SOAK_DURATION:-10m}
pc=${SOAK_POLICY_C:-8}
mc=${SOAK_MILTER_C:-8}
clients=${SOAK_CLIENTS:-100000}
need curl jq redis-server redis-cli awk
# SOAK_DURATION in seconds, for the timeline: 90s, 10m, 1h.
secs=$(awk -v d="$dur" 'BEGIN {
	n = d + 0; u = d; sub(/^[0-9.]+/, "", u)
	print (u == "h" ? n * 3600 : u == "m" ? n * 60 : n) }')
build
write_config "$work/config"
start_redis
start_policyd "redis://127.0.0.1:$redis_port/0"

"$work/policyload" -proto policy -addr "$pd_policy" -c "$pc" -clients "$clients" -duration "$dur" -json >"$work/policy.json" &
lp=$!
pids+=("$lp")
"$work/policyload" -proto milter -addr "$pd_milter" -c "$mc" -clients "$clients" -duration "$dur" -json >"$work/milter.json" &
lm=$!
pids+=("$lm")
t0=$(date +%s)

# at PERCENT: wait until that share of the run has passed.
at() {
	local t=$((t0 + secs * $1 / 100 - $(date +%s)))
	if [ "$t" -gt 0 ]; then sleep "$t"; fi
}
# sample NAME: policyd's figures now.
declare -A rss gor fds ops unavail sess
sample() {
	sess[$1]=$(curl -fsS "http://$pd_http/metrics" | awk '/^policyd_sessions_open\{protocol="policy"/ { printf "%.0f\n", $2 }')
	rss[$1]=$(metric process_resident_memory_bytes)
	gor[$1]=$(metric go_goroutines)
	fds[$1]=$(metric process_open_fds)
	ops[$1]=$(curl -fsS "http://$pd_http/metrics" | awk '/^policyd_store_operations_total\{.*result="ok"/ { s += $2 } END { printf "%.0f\n", s }')
	unavail[$1]=$(curl -fsS "http://$pd_http/metrics" | awk '/^policyd_store_operations_total\{.*result="unavailable"/ { s += $2 } END { printf "%.0f\n", s }')
	echo "$(date -u +%T) $1: rss $(mib "${rss[$1]}") MiB, goroutines ${gor[$1]}, fds ${fds[$1]}, policy sessions tracked ${sess[$1]}, store ops ok ${ops[$1]}, unavailable ${unavail[$1]}" >&2
}

# The first quarter is warm-up: every client has been seen and the
# policy front-end's session tracker has filled to its bound, so what
# grows after the start sample grows for another reason.
at 25
sample start
at 40
stop_redis
echo "$(date -u +%T) redis stopped" >&2
at 45
sample "redis down"
at 50
start_redis
echo "$(date -u +%T) redis started again" >&2
at 65
sample middle
# flood KIND: hostile milter clients for 8 % of the run, beside the load.
flood() {
	"$work/policyload" -proto milter -addr "$pd_milter" -flood "$1" -c 4 -duration "$((secs * 8 / 100 + 1))s" \
		-json >"$work/flood-$1.json" &
	pids+=("$!")
	flood_pid=$!
}
at 70
flood headers
at 76
sample "header flood"
wait "$flood_pid"
at 80
flood macros
at 86
sample "macro flood"
wait "$flood_pid"
at 95
sample end
wait "$lp" "$lm"

allow_n=$((2 * (pc + mc)))
flat() { # flat START NOW ALLOWANCE
	awk -v s="$1" -v n="$2" -v a="$3" 'BEGIN { exit !(n <= s * 1.2 + a) }'
}
verdict() {
	local what=$1 allow=$2
	local -n v=$3
	if flat "${v[start]}" "${v[middle]}" "$allow" && flat "${v[start]}" "${v[end]}" "$allow"; then
		echo "| $what | ${v[start]} | ${v[redis down]} | ${v[middle]} | ${v[end]} | flat |"
	else
		echo "| $what | ${v[start]} | ${v[redis down]} | ${v[middle]} | ${v[end]} | **grew** |"
	fi
}
for k in start "redis down" middle "header flood" "macro flood" end; do rss[$k]=$(mib "${rss[$k]}"); done
# Under a flood RSS may hold what the floods have in flight: 4
# connections, each a 64 KiB packet buffer and 64 KiB of macros, and the
# socket buffers; 32 MiB over the start's allowance is far more than that
# and far less than one flood kept (4 connections took 3 GB before the
# guard refused headers).
flood_verdict() {
	local s=${rss[start]} ok=bounded
	for k in "header flood" "macro flood"; do
		flat "$s" "${rss[$k]}" 48 || ok="**grew**"
	done
	echo "| RSS under floods (MiB) | $s | headers ${rss[header flood]} | macros ${rss[macro flood]} | | $ok |"
}

cat <<EOF
# Soak: $dur of mixed load on policyd with Redis, Redis down from 40 to 50 %, milter floods at 70 and 80 %

policy c=$pc and milter c=$mc at once, $clients distinct clients, chain
whitelist, connection_shaper, client_stats, deny_repeat_offenders
(thresholds out of reach: nothing is refused). Samples at 25 % (start,
after the warm-up), 45 % (Redis down), 65 % (middle, Redis back for 15 %
of the run), 76 % (4 hostile milter clients sending header packets
policyd never negotiated, 60 kB each, since 70 %), 86 % (4 sending a new
60 kB macro before each of 256 HELOs, since 80 %) and 95 % (end).

| | start | Redis down | middle | end | |
|---|---|---|---|---|---|
$(verdict "RSS (MiB)" 16 rss)
$(verdict goroutines "$allow_n" gor)
$(verdict "open fds" "$allow_n" fds)
$(flood_verdict)
| policy sessions tracked | ${sess[start]} | ${sess[redis down]} | ${sess[middle]} | ${sess[end]} | bounded by --policy-max-sessions |

Flat: middle and end ≤ 1.2 × start + allowance (16 MiB; $allow_n goroutines
or descriptors, twice the load's concurrency). The policy front-end
tracks a session until its policy connection carries the next session's
requests, or for 10 minutes without a request (the protocol never
reports a disconnect), at most 100 000 of them; the warm-up before the
start sample lets every client be seen first.

Store operations: ok ${ops[start]} → ${ops[redis down]} (Redis down) → ${ops[middle]} → ${ops[end]};
unavailable ${unavail[start]} → ${unavail[redis down]} → ${unavail[middle]} → ${unavail[end]}.
Policyd $( [ "${ops[end]}" -gt "${ops[middle]}" ] && echo "used Redis again after the restart" || echo "did NOT use Redis again after the restart").

| load | rate | p50 (ms) | p99 (ms) | max (ms) | errors | answers |
|---|---|---|---|---|---|---|
EOF
for f in headers macros; do
	jq -r --arg f "$f" '"| \($f) flood (per connection) | \(.rate|floor)/s | \(.latency.p50_us/10|round/100) | \(.latency.p99_us/10|round/100) | \(.latency.max_us/10|round/100) | \(.errors) \(.error_samples // [] | join("; ")) | \(.answers | to_entries | map("\(.key) \(.value)") | join(", ")) |"' "$work/flood-$f.json"
done
for p in policy milter; do
	jq -r --arg p "$p" '"| \($p) (per \(.unit)) | \(.rate|floor)/s | \(.latency.p50_us/10|round/100) | \(.latency.p99_us/10|round/100) | \(.latency.max_us/10|round/100) | \(.errors) \(.error_samples // [] | join("; ")) | \(.answers | to_entries | map("\(.key) \(.value)") | join(", ")) |"' "$work/$p.json"
done

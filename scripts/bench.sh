#!/usr/bin/env bash
# make bench: policyd against the no-op baseline, both protocols, on the
# embedded store and on Redis, at c = 1, 4, 16; then the embedded store
# with 1 k and 1 M distinct clients. Writes docs/benchmarks.md.
#
#   BENCH_DURATION   length of each measured run (default 5s)
#   BENCH_CLIENTS    distinct clients in the runs (default 1000)
#   BENCH_BIG        clients of the large-store run (default 1000000)
#   BENCH_OUT        where the report goes (default docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

dur=${BENCH_DURATION:-5s}
clients=${BENCH_CLIENTS:-1000}
big=${BENCH_BIG:-1000000}
out=${BENCH_OUT:-docs/benchmarks.md}
need curl jq redis-server redis-cli awk
build
write_config "$work/config"
mkdir -p "$work/res"

# load NAME ARGS...: one policyload run, its JSON report kept as NAME.
load() {
	local name=$1
	shift
	"$work/policyload" -clients "$clients" -json "$@" >"$work/res/$name.json"
	jq -r --arg n "$name" '"\($n): \(.rate | floor)/s p50 \(.latency.p50_us)µs p99 \(.latency.p99_us)µs errors \(.errors)"' "$work/res/$name.json" >&2
}
field() { jq -r "$2" "$work/res/$1.json"; }

# The policy profiles at c=16, beside the all-stages runs below: what
# most sites wire (check_policy_service at RCPT only, so every request
# starts a session), the recommended wiring (RCPT, DATA and
# END-OF-MESSAGE: the later two cheap repeats of a known session), and
# one request per connection (Exim's ${readsocket}).
profiles=(rcpt-only rcpt-data-eom conn-per-request)
profile_args() {
	case $1 in
	rcpt-only) echo "-states RCPT -rcpts 1" ;;
	rcpt-data-eom) echo "-states RCPT,DATA,END-OF-MESSAGE" ;;
	conn-per-request) echo "-states RCPT -rcpts 1 -conn-per-request" ;;
	esac
}

# Round trips in a row at a session start, on a real Redis made 2 ms
# away, with the read-ahead and without (rules/all): "off on".
"${GO:-go}" test -run '^$' -bench '^BenchmarkConnectRoundTrips$' -benchtime 300x ./rules/all/ |
	awk '/read-ahead=false/ { for (i = 2; i <= NF; i++) if ($i == "trips/op") off = $(i-1) }
	     /read-ahead=true/ { for (i = 2; i <= NF; i++) if ($i == "trips/op") on = $(i-1) }
	     END { if (off == "" || on == "") exit 1; print off, on }' >"$work/res/trips"

# For each store, policyd and the baseline alternate at each point, so a
# slow patch of the machine hits both.
for store in memory redis; do
	url=memory
	if [ "$store" = redis ]; then
		start_redis
		url=redis://127.0.0.1:$redis_port/0
	fi
	start_policyd "$url"
	for prof in "${profiles[@]}"; do
		# shellcheck disable=SC2046 # the profile's flags, split on purpose
		set -- $(profile_args "$prof")
		ops0=$(metric policyd_store_operations_total)
		[ "$store" = redis ] && { calls0=$(redis_calls); reads0=$(redis_reads); }
		load "$store-prof-$prof-policyd" -proto policy -addr "$pd_policy" -c 16 -duration "$dur" "$@"
		ops=$(($(metric policyd_store_operations_total) - ops0))
		if [ "$store" = redis ]; then
			echo "$ops $(($(redis_calls) - calls0)) $(($(redis_reads) - reads0))" >"$work/res/$store-prof-$prof-redis"
		fi
		load "$store-prof-$prof-baseline" -proto policy -baseline -c 16 -duration "$dur" "$@"
	done
	for proto in policy milter; do
		addr=$pd_policy
		[ "$proto" = milter ] && addr=$pd_milter
		for c in 1 4 16; do
			hooks0=$(metric policyd_hook_duration_seconds_count)
			ops0=$(metric policyd_store_operations_total)
			[ "$store" = redis ] && { calls0=$(redis_calls); scripts0=$(redis_calls evalsha eval); }
			load "$store-$proto-$c-policyd" -proto "$proto" -addr "$addr" -c "$c" -duration "$dur"
			hooks=$(($(metric policyd_hook_duration_seconds_count) - hooks0))
			ops=$(($(metric policyd_store_operations_total) - ops0))
			echo "$hooks $ops" >"$work/res/$store-$proto-$c-hooks"
			if [ "$store" = redis ]; then
				echo "$(($(redis_calls) - calls0)) $(($(redis_calls evalsha eval) - scripts0))" >"$work/res/$store-$proto-$c-redis"
			fi
			load "$store-$proto-$c-baseline" -proto "$proto" -baseline -c "$c" -duration "$dur"
		done
	done
	if [ "$store" = redis ]; then
		# Redis stopped under policyd: every rule fails open at once
		# (circuit breaker); the rate is compared with the Redis runs'
		# baseline.
		stop_redis
		load "redis-down-policy-16-policyd" -proto policy -addr "$pd_policy" -c 16 -duration "$dur"
	fi
	stop_policyd
done

# The same chain written in Lua (the twins in examples/plugins.d) against
# the Go rules, both daemons side by side, policy at c=16, twice each.
mkdir -p "$work/lua/plugins.d"
cp examples/plugins.d/lua_connection_shaper.lua examples/plugins.d/lua_deny_repeat_offenders.lua "$work/lua/plugins.d/"
cp "$work/config/whitelist" "$work/lua/"
printf '%s\n' whitelist "lua_connection_shaper threshold 1000000000 exptime 60" client_stats \
	"lua_deny_repeat_offenders threshold 1000000" >"$work/lua/plugins"
"$work/policyd" check --config "$work/lua" >/dev/null
start_policyd memory
go_pid=$pd_pid go_policy=$pd_policy
config=$work/lua start_policyd memory
for round in 1 2; do
	load "chain-go$round" -proto policy -addr "$go_policy" -c 16 -duration "$dur"
	load "chain-lua$round" -proto policy -addr "$pd_policy" -c 16 -duration "$dur"
done
stop_policyd
pd_pid=$go_pid
stop_policyd

# The embedded store with few and with many clients, policy at c=16: a
# fresh daemon per size; the large store is first filled with one session
# per client (the policy service in the recipient and end-of-data lists,
# Postfix's usual set-up). Both daemons then run side by side and are
# measured in turn, twice, so that both meet the same moments of the
# machine.
start_policyd memory
small_pid=$pd_pid small_policy=$pd_policy small_http=$pd_http
start_policyd memory
fill_start=$(date +%s)
"$work/policyload" -proto policy -addr "$pd_policy" -c 16 -clients "$big" -fill -states RCPT,END-OF-MESSAGE \
	-duration 15m -json >"$work/res/fill.json"
fill_secs=$(($(date +%s) - fill_start))
rss_filled=$(metric process_resident_memory_bytes)
records_filled=$(metric policyd_store_records)
# The table's size: its index and its records (dead ones are among the records).
table_filled=$(curl -fsS "http://$pd_http/metrics" |
	awk '/^policyd_store_bytes\{part="(index|records)"\}/ { s += $2 } END { printf "%.0f\n", s }')
for round in 1 2; do
	load "small$round" -proto policy -addr "$small_policy" -c 16 -duration "$dur"
	load "big$round" -proto policy -addr "$pd_policy" -c 16 -duration "$dur" -clients "$big"
done
rss_big=$(metric process_resident_memory_bytes)
stop_policyd
pd_pid=$small_pid pd_http=$small_http
rss_small=$(metric process_resident_memory_bytes)
stop_policyd

mkdir -p "$(dirname "$out")"
scripts/bench-report.sh "$work/res" "$dur" "$clients" "$big" "$rss_small" "$rss_filled" "$rss_big" "$fill_secs" \
	"$records_filled" "$table_filled" >"$out"
echo "wrote $out" >&2

# Shared by scripts/bench.sh and scripts/soak.sh: build, start and stop
# policyd and a private redis-server on loopback, read their counters.
# Every process is started here, as a child, and stopped by its PID.

need() {
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || { echo "$0: $t is needed (apt-get install $t)" >&2; exit 1; }
	done
}

# work is the run's private directory; everything started is stopped and
# the directory removed on exit, however the script ends.
work=$(mktemp -d -t policyd-bench.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do
		kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

build() {
	"${GO:-go}" build -o "$work/policyd" ./cmd/policyd
	"${GO:-go}" build -o "$work/policyload" ./cmd/policyload
}

# free_port prints a loopback TCP port nobody listens on, below Linux's
# ephemeral range (32768-60999), where the load's own milter connections
# leave ports in TIME_WAIT. Another process could still take it before
# it is bound: start_policyd retries.
free_port() {
	local p
	for _ in $(seq 50); do
		p=$((20000 + RANDOM % 12000))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	echo "$0: no free port found" >&2
	exit 1
}

# wait_for CMD...: poll until CMD succeeds, for up to 15 s.
wait_for() {
	for _ in $(seq 150); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "$0: timed out waiting for: $*" >&2
	return 1
}

# The chain under test: every rule runs for every load client. The
# thresholds are far above what a run reaches, so no client is refused
# and the whole chain runs at every hook; loopback (the MTA) stays
# whitelisted, the load's clients are not in it.
write_config() {
	local dir=$1
	mkdir -p "$dir"
	cat >"$dir/plugins" <<-EOF
		whitelist
		connection_shaper threshold 1000000000 exptime 60
		client_stats
		deny_repeat_offenders threshold 1000000
	EOF
	echo "clients 127.0.0.0/8, ::1/128" >"$dir/whitelist"
	"$work/policyd" check --config "$dir" >/dev/null
}

# start_policyd STORE: starts policyd on fresh ports and a fresh state
# directory; sets pd_pid, pd_policy, pd_milter, pd_http.
start_policyd() {
	local store=$1 state
	for _ in 1 2 3 4 5; do
		pd_policy=127.0.0.1:$(free_port)
		pd_milter=127.0.0.1:$(free_port)
		pd_http=127.0.0.1:$(free_port)
		state=$(mktemp -d "$work/state.XXXXXX")
		"${pd_bin:-$work/policyd}" serve --config "${config:-$work/config}" --store "$store" --state-dir "$state" \
			--policy-listen "$pd_policy" --milter-listen "$pd_milter" --http-listen "$pd_http" \
			--log-level warn 2>>"$work/policyd.log" &
		pd_pid=$!
		pids+=("$pd_pid")
		if wait_for ready_or_gone; then
			kill -0 "$pd_pid" 2>/dev/null && return 0
		fi
		wait "$pd_pid" || true # a port was taken: try others
	done
	tail -20 "$work/policyd.log" >&2
	exit 1
}

# ready_or_gone succeeds once policyd is ready or has exited.
ready_or_gone() {
	curl -fsS "http://$pd_http/readyz" || ! kill -0 "$pd_pid" 2>/dev/null
}

stop_policyd() {
	kill -TERM "$pd_pid"
	wait "$pd_pid" || true
}

# start_redis: a private redis-server without persistence; sets
# redis_pid, redis_port (kept across a restart).
start_redis() {
	redis_port=${redis_port:-$(free_port)}
	mkdir -p "$work/redis"
	redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
		--dir "$work/redis" --daemonize no --logfile "$work/redis/log" &
	redis_pid=$!
	pids+=("$redis_pid")
	wait_for redis-cli -p "$redis_port" ping || { tail -20 "$work/redis/log" >&2; exit 1; }
}

stop_redis() {
	kill -TERM "$redis_pid"
	wait "$redis_pid" || true
}

# metric NAME: the sum of every series of NAME on policyd's /metrics.
metric() {
	curl -fsS "http://$pd_http/metrics" | awk -v n="$1" '
		index($1, n) == 1 && (length($1) == length(n) || substr($1, length(n) + 1, 1) == "{") { s += $2 }
		END { printf "%.0f\n", s }'
}

# redis_calls [CMD...]: commands Redis executed (INFO commandstats), all of
# them but INFO (our own sampling) or only those named. Commands run by
# Lua scripts are counted too.
redis_calls() {
	redis-cli -p "$redis_port" info commandstats | tr -d '\r' | awk -F'[_:=,]' -v only="$*" '
		BEGIN { n = split(only, w, " "); for (i = 1; i <= n; i++) want[w[i]] = 1 }
		/^cmdstat_/ { if (n == 0 ? $2 != "info" : ($2 in want)) s += $4 }
		END { printf "%.0f\n", s }'
}

# redis_reads: the read system calls redis-server has made: with
# pipelining one read carries many commands, so the reads during a run,
# per request, are the round trips the run cost Redis.
redis_reads() {
	awk '/^syscr:/ { print $2 }' "/proc/$redis_pid/io"
}

# ratio A B: A/B with two decimals, "-" when B is 0.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f\n", a / b }'; }

# atleast A B: whether A >= B.
atleast() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }

mib() { awk -v b="$1" 'BEGIN { printf "%.0f\n", b / 1048576 }'; }

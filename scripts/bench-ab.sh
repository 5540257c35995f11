#!/usr/bin/env bash
# bench-ab.sh REV [STORE]: policyd built from REV against policyd built
# from the working tree, both serving at once on one store (memory, or
# redis: one private redis-server for both) and measured in turns with
# the no-op server, so a slow patch of the shared machine hits all three.
# A change's before/after figures come from one run of this script.
#
#   AB_ARGS      policyload's profile (default "-states RCPT -rcpts 1")
#   AB_ROUNDS    turns of the three (default 3)
#   AB_DURATION  length of each run (default 4s)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

rev=${1:?usage: $0 REV [memory|redis]}
store=${2:-memory}
args=${AB_ARGS:--states RCPT -rcpts 1}
rounds=${AB_ROUNDS:-3}
dur=${AB_DURATION:-4s}
need curl jq
[ "$store" = redis ] && need redis-server redis-cli

build
cp "$work/policyd" "$work/policyd-new"
# The base's tree, without a worktree that an interrupted run would leave
# registered in .git.
mkdir "$work/base"
git archive "$rev" | tar -x -C "$work/base"
(cd "$work/base" && "${GO:-go}" build -o "$work/policyd-base" ./cmd/policyd)
write_config "$work/config"

base_url=memory new_url=memory
if [ "$store" = redis ]; then
	# One server, a database each: neither meets the other's records.
	start_redis
	base_url=redis://127.0.0.1:$redis_port/0 new_url=redis://127.0.0.1:$redis_port/1
fi
pd_bin=$work/policyd-base start_policyd "$base_url"
base_policy=$pd_policy
pd_bin=$work/policyd-new start_policyd "$new_url"
new_policy=$pd_policy

# run NAME ARGS...: one policyload run; its rate and p99 in $work/NAME.
# A failed run stops the script (set -e), never reads as a zero rate.
run() {
	local name=$1
	shift
	# shellcheck disable=SC2086 # the profile's flags, split on purpose
	"$work/policyload" -clients 1000 -c 16 -duration "$dur" -json $args "$@" >"$work/$name.json"
	jq -er '"\(.rate | floor) \(.latency.p99_us)"' "$work/$name.json" >"$work/$name"
}
printf '%-6s %10s %10s %10s %8s %8s\n' round base new noop base× new×
for r in $(seq "$rounds"); do
	run "base$r" -proto policy -addr "$base_policy"
	run "new$r" -proto policy -addr "$new_policy"
	run "noop$r" -proto policy -baseline
	read -r b bp <"$work/base$r"
	read -r n np <"$work/new$r"
	read -r z zp <"$work/noop$r"
	printf '%-6s %10s %10s %10s %8s %8s   p99 µs: %s %s %s\n' "$r" "$b" "$n" "$z" "$(ratio "$b" "$z")" "$(ratio "$n" "$z")" "$bp" "$np" "$zp"
done

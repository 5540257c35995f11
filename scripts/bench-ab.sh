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
git worktree add -q --detach "$work/base" "$rev"
(cd "$work/base" && "${GO:-go}" build -o "$work/policyd-base" ./cmd/policyd)
git worktree remove --force "$work/base"
write_config "$work/config"

url=memory
if [ "$store" = redis ]; then
	start_redis
	url=redis://127.0.0.1:$redis_port/0
fi
pd_bin=$work/policyd-base start_policyd "$url"
base_policy=$pd_policy
pd_bin=$work/policyd-new start_policyd "$url"
new_policy=$pd_policy

run() {
	local name=$1
	shift
	# shellcheck disable=SC2086 # the profile's flags, split on purpose
	"$work/policyload" -clients 1000 -c 16 -duration "$dur" -json $args "$@" >"$work/$name.json"
	jq -r '"\(.rate | floor) \(.latency.p99_us)"' "$work/$name.json"
}
printf '%-6s %10s %10s %10s %8s %8s\n' round base new noop base× new×
for r in $(seq "$rounds"); do
	read -r b bp < <(run "base$r" -proto policy -addr "$base_policy")
	read -r n np < <(run "new$r" -proto policy -addr "$new_policy")
	read -r z zp < <(run "noop$r" -proto policy -baseline)
	printf '%-6s %10s %10s %10s %8s %8s   p99 µs: %s %s %s\n' "$r" "$b" "$n" "$z" "$(ratio "$b" "$z")" "$(ratio "$n" "$z")" "$bp" "$np" "$zp"
done

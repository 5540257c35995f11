#!/usr/bin/env bash
# Installs what the tests run for real: Postfix, Redis, swaks, miltertest.
# Under CI=true a missing tool that cannot be installed is an error, never
# a reason to skip tests.
set -euo pipefail

need=()
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v miltertest >/dev/null 2>&1 || need+=(miltertest)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing ${need[*]} and cannot install them (needs root and apt-get)" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "install-deps: the tests that use them will fail" >&2
  exit 0
fi

echo "install-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# Postfix must not configure or start a system instance: tests run their own.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Installs what the tests run for real: Postfix, Redis, swaks, miltertest,
# lua5.1 (the reference the Lua sandbox's pattern matcher is checked against),
# a private Exim 4.96 unpacked into .cache/exim (with its user Debian-exim),
# and a private Sendmail 8.17 unpacked into .cache/sendmail.
# Under CI=true a missing tool that cannot be installed is an error, never
# a reason to skip tests.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

# cannot MESSAGE: under CI=true exit 1, else warn and go on.
cannot() {
  echo "install-deps: $*" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  echo "install-deps: the tests that need it will fail" >&2
}

is_root_with_apt() {
  [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1
}

apt_updated=
apt_update() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
}

# --- System packages ---------------------------------------------------------

need=()
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v lua5.1 >/dev/null 2>&1 || need+=(lua5.1)
command -v miltertest >/dev/null 2>&1 || need+=(miltertest)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)

if [ ${#need[@]} -gt 0 ]; then
  if ! is_root_with_apt; then
    cannot "missing ${need[*]} and cannot install them (needs root and apt-get)"
  else
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not configure or start a system instance: tests run their own.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt_update
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

# --- Private Sendmail (internal/testing/testmta.StartSendmail) -----------------------
#
# Debian's sendmail-bin conflicts with postfix, so it is never installed:
# its .debs (and those of sendmail-cf, m4 and libwrap0, whose libwrap.so.0 a
# Postfix machine lacks) are downloaded and unpacked with dpkg-deb -x into
# .cache/sendmail (or $TESTMTA_SENDMAIL_ROOT). The sendmail binary there has
# its setgid bit removed: a setgid binary ignores LD_LIBRARY_PATH, which the
# tests point at the unpacked libwrap0. Nothing is installed system-wide
# except, if missing, ordinary shared-library packages sendmail-bin links
# against (libdb5.3, libldap, libsasl2, ...), which coexist with Postfix.

sm_root=${TESTMTA_SENDMAIL_ROOT:-.cache/sendmail}
case $sm_root in /*) ;; *) sm_root=$repo/$sm_root ;; esac # as the tests take it
sm_stamp=$sm_root/.provisioned
sm_pkgs=(sendmail-bin sendmail-cf m4 libwrap0)

sm_binary() { # prints the sendmail binary of tree $1
  local b
  for b in "$1/usr/libexec/sendmail/sendmail" "$1/usr/lib/sm.bin/sendmail"; do
    if [ -f "$b" ]; then echo "$b"; return 0; fi
  done
  return 1
}

sm_libpath() { # prints LD_LIBRARY_PATH for tree $1
  local d out=
  for d in "$1"/lib/*-linux-gnu* "$1"/usr/lib/*-linux-gnu*; do
    [ -d "$d" ] && out=${out:+$out:}$d
  done
  echo "$out"
}

sm_missing_libs() { # prints the libraries the binary of tree $1 cannot find
  local bin
  bin=$(sm_binary "$1")
  LD_LIBRARY_PATH=$(sm_libpath "$1") ldd "$bin" 2>/dev/null | awk '/not found/ {print $1}'
}

# fetch_debs ROOT PKG...: downloads PKGs and unpacks them into a new
# directory beside ROOT, left in $fetched (the tree is its tree/, the
# packages' versions in tree/.versions). On failure it says why (cannot,
# which exits under CI=true) and fails. The directory is removed at exit
# unless moved. Not to be run in a subshell: cannot must end the script.
fetch_tmps=()
trap 'for d in "${fetch_tmps[@]}"; do rm -rf "$d"; done' EXIT
fetch_debs() {
  local root=$1
  shift
  mkdir -p "$(dirname "$root")"
  local tmp
  tmp=$(mktemp -d "$root.tmp.XXXXXX")
  fetch_tmps+=("$tmp")
  mkdir "$tmp/debs" "$tmp/tree"
  # As root apt drops to the _apt user for downloads, which cannot write
  # into a 0700 temporary directory: download as root.
  local dl=(apt-get -qq -o APT::Sandbox::User=root download "$@")
  if ! (cd "$tmp/debs" && "${dl[@]}") 2>"$tmp/err"; then
    # A fresh machine may have no package lists yet.
    if [ "$(id -u)" -eq 0 ] && apt_update && (cd "$tmp/debs" && "${dl[@]}") 2>"$tmp/err"; then
      :
    else
      cat "$tmp/err" >&2
      cannot "could not download $*"
      return 1
    fi
  fi
  local deb
  for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$tmp/tree"
    dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >>"$tmp/tree/.versions"
  done
  fetched=$tmp
}

provision_sendmail() {
  if [ -f "$sm_stamp" ] && sm_binary "$sm_root" >/dev/null &&
     [ -x "$sm_root/usr/bin/m4" ] && [ -f "$sm_root/usr/share/sendmail/cf/m4/cf.m4" ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    cannot "no private Sendmail in $sm_root and no apt-get/dpkg-deb to fetch ${sm_pkgs[*]}"
    return 0
  fi
  echo "install-deps: unpacking ${sm_pkgs[*]} into $sm_root"
  fetch_debs "$sm_root" "${sm_pkgs[@]}" || return 0
  local tmp=$fetched
  local bin
  if ! bin=$(sm_binary "$tmp/tree"); then
    cannot "the sendmail-bin package has no sendmail binary where expected"
    return 0
  fi
  chmod ug-s "$bin"

  # Shared libraries the binary links against that this machine lacks.
  local missing
  missing=$(sm_missing_libs "$tmp/tree")
  if [ -n "$missing" ]; then
    echo "install-deps: sendmail lacks $(echo "$missing" | paste -sd' ')" >&2
    local libpkgs=() p
    for p in $(apt-cache depends sendmail-bin 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^lib/ {print $2}'); do
      case " ${sm_pkgs[*]} " in *" $p "*) continue ;; esac # unpacked above
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || libpkgs+=("$p")
    done
    if [ ${#libpkgs[@]} -gt 0 ] && is_root_with_apt; then
      echo "install-deps: installing ${libpkgs[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${libpkgs[@]}" >/dev/null
    fi
    missing=$(sm_missing_libs "$tmp/tree")
    if [ -n "$missing" ]; then
      cannot "sendmail still lacks the shared libraries $(echo "$missing" | paste -sd' ')"
      return 0
    fi
  fi

  date -u +%FT%TZ >"$tmp/tree/.provisioned"
  rm -rf "$sm_root"
  mv "$tmp/tree" "$sm_root"
  echo "install-deps: private Sendmail ready in $sm_root ($(grep '^sendmail-bin ' "$sm_root/.versions"))"
}

provision_sendmail

# --- Private Exim 4.96 -------------------------------------------------------
# exim4-daemon-light conflicts with postfix (both are the mail transport
# agent), so it is unpacked into .cache/exim (or $TESTMTA_EXIM_ROOT), never
# installed. The shared libraries it links against coexist with Postfix and
# are installed normally; its compiled-in user must exist.

ex_root=${TESTMTA_EXIM_ROOT:-.cache/exim}
case $ex_root in /*) ;; *) ex_root=$repo/$ex_root ;; esac
ex_bin=$ex_root/usr/sbin/exim4

ex_missing_libs() {
  ldd "$1" 2>/dev/null | awk '/not found/ {print $1}'
}

provision_exim() {
  if [ -f "$ex_root/.provisioned" ] && [ -x "$ex_bin" ] && [ -z "$(ex_missing_libs "$ex_bin")" ] &&
     id Debian-exim >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    cannot "no private Exim in $ex_root and no apt-get/dpkg-deb to fetch exim4-daemon-light"
    return 0
  fi
  if ! id Debian-exim >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
      cannot "Exim's user Debian-exim is missing (as root: useradd --system --no-create-home --shell /usr/sbin/nologin Debian-exim)"
      return 0
    fi
    useradd --system --no-create-home --shell /usr/sbin/nologin Debian-exim
  fi
  if [ ! -x "$ex_bin" ] || [ ! -f "$ex_root/.provisioned" ]; then
    echo "install-deps: unpacking exim4-daemon-light into $ex_root"
    fetch_debs "$ex_root" exim4-daemon-light || return 0
    local tmp=$fetched
    date -u +%FT%TZ >"$tmp/tree/.provisioned"
    rm -rf "$ex_root"
    mv "$tmp/tree" "$ex_root"
  fi
  local missing
  missing=$(ex_missing_libs "$ex_bin")
  if [ -n "$missing" ] && is_root_with_apt; then
    local libpkgs=() p
    for p in $(apt-cache depends exim4-daemon-light 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^lib/ {print $2}'); do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || libpkgs+=("$p")
    done
    if [ ${#libpkgs[@]} -gt 0 ]; then
      echo "install-deps: installing ${libpkgs[*]} for Exim"
      apt_update
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${libpkgs[@]}" >/dev/null
    fi
    missing=$(ex_missing_libs "$ex_bin")
  fi
  if [ -n "$missing" ]; then
    cannot "exim4 lacks the shared libraries $(echo "$missing" | paste -sd' ')"
    return 0
  fi
  echo "install-deps: private Exim ready in $ex_root ($(cat "$ex_root/.versions"))"
}

provision_exim

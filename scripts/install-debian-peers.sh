#!/usr/bin/env bash
# Install the real peer daemons the integration tests start privately (Debian/Ubuntu).
#
# The tests never use a system instance of these daemons: each fixture starts its own
# on loopback with a config in a temp dir. So this script only puts the binaries on the
# machine, and makes sure that installing them does not leave system instances running:
# while it installs, a policy-rc.d that denies every service start is in place (unless
# the machine already has one, as container images do), and any daemon this run
# installed that is running afterwards anyway is stopped and disabled.
#
# Idempotent: when every binary below exists it does nothing (no apt-get update). Runs
# as root; otherwise through sudo when there is one; otherwise it prints what to install
# and exits 1.
#
# Add a peer by adding "package:/path/of/a/binary/it/ships" to PEERS (and its system
# service, if it has one, to SERVICES).
set -euo pipefail

PEERS=(
    "dovecot-core:/usr/sbin/dovecot"
    "dovecot-lmtpd:/usr/lib/dovecot/lmtp"
    "swaks:/usr/bin/swaks"
    "postfix:/usr/sbin/postfix"
    "nsd:/usr/sbin/nsd"  # authoritative DNS (tests/peers/dns.py); ships nsd-control too
    "opendkim-tools:/usr/sbin/opendkim-genkey"  # third-party DKIM keys for the tests
    "libmail-dkim-perl:/usr/bin/dkimproxy-sign"  # third-party DKIM signer (Mail::DKIM)
    "rspamd:/usr/bin/rspamd"  # spam scanner (tests/peers/rspamd.py); ships rspamadm
    "redis-server:/usr/bin/redis-server"  # shared state (tests/peers/redis.py)
    "clamav-daemon:/usr/sbin/clamd"  # antivirus scanner (tests/peers/clamd.py)
    "openssl:/usr/bin/openssl"  # RSA keys too small for `cryptography` (RFC 8301 tests)
)
# Tools the build itself needs (`make test` on a bare machine).
TOOLS=(
    "make:/usr/bin/make"
)
# package -> system service that its installation may start.
declare -A SERVICES=(
    [dovecot-core]=dovecot
    [postfix]=postfix
    [redis-server]=redis-server
    [clamav-daemon]=clamav-daemon
    [rspamd]=rspamd
    [nsd]=nsd
)

missing=()
for entry in "${TOOLS[@]}" "${PEERS[@]}"; do
    package=${entry%%:*}
    binary=${entry#*:}
    if [[ ! -x $binary ]]; then
        missing+=("$package")
    fi
done

if ((${#missing[@]} == 0)); then
    exit 0
fi

echo "install-debian-peers: missing ${missing[*]}" >&2

if ((EUID == 0)); then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "install-debian-peers: not root and no sudo; as root, run:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-debian-peers: no apt-get here; install these packages: ${missing[*]}" >&2
    exit 1
fi

# Deny service starts during the install, unless the machine has its own policy.
policy=/usr/sbin/policy-rc.d
own_policy=no
if [[ ! -e $policy ]]; then
    own_policy=yes
    printf '#!/bin/sh\n# installed by mailedge scripts/install-debian-peers.sh\nexit 101\n' |
        "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod 755 "$policy"
fi
remove_policy() {
    if [[ $own_policy == yes ]]; then
        "${as_root[@]}" rm -f "$policy"
    fi
}
trap remove_policy EXIT

# Postfix asks how to configure the system MTA; "No configuration" writes no main.cf,
# so no system instance is set up (the tests bring their own config directory).
if [[ " ${missing[*]} " == *" postfix "* ]]; then
    printf '%s\n' \
        "postfix postfix/main_mailer_type select No configuration" \
        "postfix postfix/mailname string localhost" |
        "${as_root[@]}" debconf-set-selections
fi

"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}"

# Whatever this run installed must not be left running as a system service.
for package in "${missing[@]}"; do
    service=${SERVICES[$package]:-}
    [[ -n $service ]] || continue
    if [[ -d /run/systemd/system ]]; then
        "${as_root[@]}" systemctl disable --now "$service" >/dev/null 2>&1 || true
    else
        if command -v service >/dev/null 2>&1; then
            "${as_root[@]}" service "$service" stop >/dev/null 2>&1 || true
        fi
        if command -v systemctl >/dev/null 2>&1; then  # not at the next boot either
            "${as_root[@]}" systemctl disable "$service" >/dev/null 2>&1 || true
        fi
    fi
done
if [[ " ${missing[*]} " == *" postfix "* ]] && "${as_root[@]}" postfix status >/dev/null 2>&1; then
    "${as_root[@]}" postfix stop >/dev/null 2>&1 || true
fi

failed=()
for entry in "${TOOLS[@]}" "${PEERS[@]}"; do
    [[ -x ${entry#*:} ]] || failed+=("${entry%%:*} (${entry#*:})")
done
if ((${#failed[@]})); then
    echo "install-debian-peers: still missing after install: ${failed[*]}" >&2
    exit 1
fi
echo "install-debian-peers: done" >&2

#!/usr/bin/env bash
# Entry point of `make bench` (issue 6; results in docs/performance.md).
#
# Sets up what the benchmark needs on a fresh Debian machine, then runs bench/bench.py
# with any arguments given here (e.g. `bash bench/run.sh --full`, `--only chain`;
# `--help` lists them):
#   - Postfix with smtp-source, smtp-sink and postmap (Debian package `postfix`), and
#     for the full-chain case rspamd, clamd (clamav-daemon) and NSD, all through
#     scripts/install-debian-peers.sh, which never leaves a system instance running;
#   - taskset (util-linux), only needed for `--pin one-core`;
#   - the .venv with mailedge (`make bench` has built it already; built here otherwise)
#     and py-spy in it (only needed for --py-spy).
# The benchmark only ever uses 127.0.0.1 and private instances in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

for binary in /usr/sbin/smtp-source /usr/sbin/smtp-sink /usr/sbin/postfix /usr/sbin/postmap \
              /usr/bin/rspamd /usr/sbin/clamd /usr/sbin/nsd; do
    if [[ ! -x $binary ]]; then
        bash scripts/install-debian-peers.sh
        break
    fi
done
if [[ " $* " == *" one-core "* || " $* " == *" --pin=one-core "* ]] \
        && ! command -v taskset >/dev/null 2>&1; then
    echo "bench: --pin one-core needs taskset (apt-get install util-linux)" >&2
    exit 1
fi
if [[ ! -x .venv/bin/mailedge ]]; then
    make venv
fi
if [[ " $* " == *" --py-spy "* ]] && [[ ! -x .venv/bin/py-spy ]]; then
    .venv/bin/python -m pip install --disable-pip-version-check -q py-spy
fi
if ((EUID != 0)); then
    echo "bench: runs as root (postfix -c DIR start; smtp-sink -u nobody; rspamd -u _rspamd)" >&2
    exit 1
fi

exec .venv/bin/python bench/bench.py "$@"

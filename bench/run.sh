#!/usr/bin/env bash
# Entry point of `make bench` (issue 6; results in docs/performance.md).
#
# Sets up what the benchmark needs on a fresh Debian machine, then runs bench/bench.py
# with any arguments given here (e.g. `bash bench/run.sh --full`; `--help` lists them):
#   - Postfix with smtp-source and smtp-sink (Debian package `postfix`), through
#     scripts/install-debian-peers.sh, which never leaves a system instance running;
#   - taskset (util-linux) to pin the servers and the load tools to separate cores;
#   - the .venv with mailedge (`make bench` has built it already; built here otherwise)
#     and py-spy in it (only needed for --py-spy).
# The benchmark only ever uses 127.0.0.1 and a private Postfix instance in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x /usr/sbin/smtp-source || ! -x /usr/sbin/smtp-sink || ! -x /usr/sbin/postfix ]]; then
    bash scripts/install-debian-peers.sh
fi
if ! command -v taskset >/dev/null 2>&1; then
    echo "bench: taskset missing (apt-get install util-linux); running unpinned" >&2
    set -- --no-pin "$@"
fi
if [[ ! -x .venv/bin/mailedge ]]; then
    make venv
fi
if [[ " $* " == *" --py-spy "* ]] && [[ ! -x .venv/bin/py-spy ]]; then
    .venv/bin/python -m pip install --disable-pip-version-check -q py-spy
fi
if ((EUID != 0)); then
    echo "bench: runs as root (postfix -c DIR start; smtp-sink -u nobody)" >&2
    exit 1
fi

exec .venv/bin/python bench/bench.py "$@"

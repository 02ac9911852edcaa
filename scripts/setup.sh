#!/usr/bin/env bash
# Idempotent setup on Debian bookworm as root: host packages (pinned to
# bookworm) and a Python venv in .venv with pyvmm installed editable.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

APT_PKGS=(gcc binutils make libc6-dev linux-libc-dev python3 python3-venv python3-dev
          qemu-system-x86 acpica-tools iproute2 fio debootstrap util-linux libseccomp2
          chromium chromium-driver  # these two: the web page's browser test
          console-setup-linux)  # the PSF font VGA text mode is drawn with
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # -t bookworm: a machine may carry extra suites; the host stays on bookworm.
    apt-get install -y -qq -t bookworm --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.pyvmm-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing pyvmm and its dev tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi

#!/usr/bin/env bash
# Install the headless browser the report tests drive (tests/test_browser.py).
# Debian's own chromium (no Playwright browser download, which CI machines cannot reach)
# plus DejaVu fonts so SVG text renders. Idempotent: does nothing when a binary is present.
# Set CHROMIUM_PATH to use a browser installed elsewhere.
set -euo pipefail

for candidate in "${CHROMIUM_PATH:-}" chromium chromium-headless-shell /usr/lib/chromium/chromium-headless-shell; do
    if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
        echo "chromium already installed: $(command -v "$candidate")"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no chromium and no apt-get; install Chromium yourself and set CHROMIUM_PATH" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
echo "chromium installed: $(command -v chromium)"

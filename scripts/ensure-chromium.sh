#!/bin/sh
# Make sure headless Chromium is available for the real-browser Prefect UI test
# (tests/integration/test_flow_ui.py). CI runs this before `make test`; locally the test
# skips with a clear reason when Chromium is missing and this script cannot install it.
set -eu
for candidate in "${CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        echo "chromium: $candidate"
        exit 0
    fi
done
if [ "$(id -u)" != "0" ]; then
    echo "chromium missing and not root: run 'sudo apt-get install -y chromium' (the browser test skips without it)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium missing and no apt-get: install Chromium by hand (the browser test skips without it)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-dejavu-core
echo "chromium: $(command -v chromium)"

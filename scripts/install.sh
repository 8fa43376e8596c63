#!/usr/bin/env bash
# Create .venv (or $ELGS_VENV) with torch 2.14.1 / torchvision 0.29.1 and elgs installed editable, with the
# test and ray extras.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ELGS_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
log=$(mktemp)
pip_install() {
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 \
    || { grep -v "^WARNING: Location" "$log" >&2; return 1; }
}
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e '.[test,ray]'   # test includes the bench packages (httpx, matplotlib); ray: tests/ray runs Ray Serve (~45 s more)
rm -f "$log"
"$venv/bin/python" -c "import elgs, torch, torchvision, efficientnet_lite_pytorch, fastapi, pytest"

#!/usr/bin/env bash
# The one test command, for a fresh Debian 12 machine and for CI (.ci/run calls it).
# Installs what the tests need where it is missing, then runs pytest with the arguments
# given here: PostgreSQL 15 with pg_cron and PL/Python, PgBouncer (apt), this package with its test
# extras (pip), and the pinned Supabase CLI (npm, into the git-ignored .tools/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUPABASE_VERSION="2.117.0"
APT_PACKAGES=(postgresql-15 postgresql-15-cron postgresql-plpython3-15 pgbouncer)

say() { echo "scripts/test.sh: $*"; }

# System packages --------------------------------------------------------------------------
have_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# Debian's python3 refuses `pip install` outside a virtualenv (PEP 668): use .venv there.
externally_managed() {
  python3 - <<'PY'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) and sys.prefix == sys.base_prefix else 1)
PY
}

wanted=("${APT_PACKAGES[@]}")
command -v npm >/dev/null || wanted+=(nodejs npm)
use_venv=0
if externally_managed; then
  use_venv=1
  python3 -c 'import ensurepip' 2>/dev/null || wanted+=(python3-venv)
fi

missing=()
for pkg in "${wanted[@]}"; do
  have_deb "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    say "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  else
    echo "scripts/test.sh: the tests need the Debian packages ${missing[*]}: run 'sudo apt-get update && sudo apt-get install -y ${missing[*]}' (or run this script as root), then run it again." >&2
    exit 1
  fi
fi

# Python package with its test extras ----------------------------------------------------------
PYTHON=python3
if ((use_venv)); then
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  PYTHON=.venv/bin/python
fi
"$PYTHON" -m pip install -q -e '.[test]'

# Supabase CLI, pinned, into .tools/ -----------------------------------------------------------
installed=""
if [[ -x .tools/node_modules/.bin/supabase && -f .tools/node_modules/supabase/package.json ]]; then
  installed="$(node -p "require('./.tools/node_modules/supabase/package.json').version" 2>/dev/null || true)"
fi
if [[ "$installed" != "$SUPABASE_VERSION" ]]; then
  say "installing supabase@$SUPABASE_VERSION into .tools/"
  npm i -E --prefix .tools --no-audit --no-fund "supabase@$SUPABASE_VERSION"
fi

exec "$PYTHON" -m pytest "$@"

#!/usr/bin/env bash
# Creates (once) and prints the path of the project's virtual environment.
# The venv lives outside the clone, keyed by a hash of the dependency spec in pyproject.toml, so a fresh
# clone or a CI run reuses it; the project itself is (re)installed editable into it on every call (seconds).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
cache=${ALIGNLOOP_CACHE:-$HOME/.cache/alignloop}
key=$("$py" - "$root/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
spec = [sys.version_info[:2], project["dependencies"], project.get("optional-dependencies", {})]
print(hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12])
PY
)
venv="$cache/venv-$key"
if [ ! -f "$venv/.deps-ok" ]; then
  echo "alignloop: creating the environment $venv (first run downloads several GB)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  # Dependencies only; the project goes in editable below so the venv is independent of this clone's path.
  "$venv/bin/python" - "$root/pyproject.toml" > "$venv/requirements.txt" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + [r for group in project.get("optional-dependencies", {}).values() for r in group]:
    print(req)
PY
  "$venv/bin/pip" install --quiet -r "$venv/requirements.txt" >&2
  touch "$venv/.deps-ok"
fi
if [ "$(cat "$venv/.project-root" 2>/dev/null)" != "$root" ]; then
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$root" >&2
  echo "$root" > "$venv/.project-root"
fi
echo "$venv"

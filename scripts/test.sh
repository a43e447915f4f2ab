#!/usr/bin/env bash
# Install protfold with its test extra (CPU torch wheel) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" 2>/dev/null || python3 -m pip install -q "torch>=2.6,<2.15"
python3 -m pip install -q -e ".[test,lowbit]" -c constraints.txt  # the versions the suite was checked with
python3 -m ruff check protfold tests  # lint first (pyproject's [tool.ruff]); a finding fails the script
set +e
python3 -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"

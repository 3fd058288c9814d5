#!/usr/bin/env bash
# The README's test command: set up from scratch if needed, then the CPU suite (Triton interpreted).
set -euo pipefail
CHRONICALS_EXTRAS=test,quack . "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export TRITON_INTERPRET=1 HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
python -m pytest -q -p no:cacheprovider --durations=12 "$@"

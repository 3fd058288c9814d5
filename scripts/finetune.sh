#!/usr/bin/env bash
# The README's main command: set up from scratch if needed, then fine-tune on the embedded default.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
chronicals finetune "$@"

#!/usr/bin/env bash
# Offline quickstart: the whole pipeline end to end (corpus, tokenizer, teacher, distillation with and
# without DIITO, at equal compute and the ablation, evaluation, causal alignment) ending with <out>/report.md.
# Options: scripts/quickstart.py --help. How long it takes: docs/quickstart.md.
#   scripts/quickstart.sh                      # writes ./quickstart_out
#   scripts/quickstart.sh --preset test --seeds 1 --out /tmp/qs
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python "$(dirname "$0")/quickstart.py" "$@"

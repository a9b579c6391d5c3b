#!/usr/bin/env bash
# Every figure and table of docs/FINDINGS.md from scratch (about an hour on 2 CPU cores).
set -euo pipefail
here="$(dirname "$0")"
"$here/federated_settings.sh"
"$here/tradeoff.sh"
"$here/regularization.sh"
"$here/heterogeneity.sh"
"$here/adapters.sh"

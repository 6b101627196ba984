#!/usr/bin/env bash
# CI: every Hugging Face test file under the newest transformers release they support (TESTED_TRANSFORMERS[-1]),
# in a second environment layered on the first (its torch, deepspeed and this package); the first
# holds the oldest (.ci/run installs the autoep extra, transformers<5.23). HF_NEWEST_VENV reuses a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${HF_NEWEST_VENV:-${TMPDIR:-/tmp}/expert_parallel-hf-newest}
newest=$(python -c "from expert_parallel.integrations.huggingface import TESTED_TRANSFORMERS; print(TESTED_TRANSFORMERS[-1])")
[ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==$newest"
"$venv/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$newest')"
# every Hugging Face test file: test_huggingface*.py and the families' and loader's test_hf_*.py
"$venv/bin/python" -m pytest tests/integration/test_huggingface*.py tests/integration/test_hf_*.py -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# timm 1.0.31's own tests of its train.py and validate.py, run against ours: the peer suite (.ci/run runs it after
# our own tests). The tests come from timm's sdist on PyPI, which ships them (not the scripts); nothing of them is
# copied into this project. Our checkout comes first on sys.path, so `import train` / `import validate` are ours;
# tests/peer/timm_peer.py marks our deliberate differences xfail(strict=True), each with its reason.
#
#   tests/peer/run_timm_tests.sh [pytest options]      (PYTHON, default .venv/bin/python; offline once cached)
#
# What runs: tests/test_train_resume.py whole, and the tests of tests/test_multilabel.py that drive train.py,
# validate.py or class_weights.py (they need Hugging Face `datasets` for their hfds/ fixture). Not run:
# tests/test_sweep.py imports timm's sweep.py at module level, which is published nowhere (not in the sdist, the wheel
# or the repository), so it cannot be collected.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
VERSION=1.0.31
SDIST="timm-$VERSION.tar.gz"
CACHE="${TIMM_PEER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/subnet-peer}"  # the sdist, kept for offline reruns
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ ! -f "$CACHE/$SDIST" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$WORK" "timm==$VERSION"
    mkdir -p "$CACHE" && cp "$WORK/$SDIST" "$CACHE/$SDIST.part" && mv "$CACHE/$SDIST.part" "$CACHE/$SDIST"
fi
# the tests only: the sdist's timm/ sources must not shadow the installed library
tar -xzf "$CACHE/$SDIST" -C "$WORK" --strip-components=1 "timm-$VERSION/tests"

cd "$WORK"
MULTILABEL=tests/test_multilabel.py
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONPATH="$ROOT:$ROOT/tests/peer${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m pytest -p timm_peer -p no:cacheprovider -q -rxXs "$@" \
    tests/test_train_resume.py \
    "$MULTILABEL::test_train_cli_rejects_metric_the_evaluator_does_not_produce" \
    "$MULTILABEL::test_multilabel_train_cli_multihot" \
    "$MULTILABEL::test_multilabel_train_and_validate_cli" \
    "$MULTILABEL::test_train_cli_loss_flags" \
    "$MULTILABEL::test_class_weights_script"

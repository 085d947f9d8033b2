#!/usr/bin/env bash
# Builds gam_ext's CPU kernels against another Python or PyTorch than the one make installs, the
# way a user installs it (pip, without build isolation), and runs the tests that need no GPU and
# no emulator (ops, compile and opcheck, model, generation, checkpoints) against the installed copy.
#   bash scripts/compat_check.sh PYTHON TORCH_VERSION [WORKDIR]
#   bash scripts/compat_check.sh /usr/bin/python3.10 2.4.1
# PYTHON is an interpreter to make the venv from; TORCH_VERSION a version pip can install. The
# repository's committed HEAD is cloned into WORKDIR (default: a new temporary folder), beside the
# venv. Downloads torch from the package index (about 3 GB with its CUDA libraries); the build takes
# 5 to 10 minutes and the tests 3 to 7 on 2 cores.
set -euo pipefail
python=${1:?usage: bash scripts/compat_check.sh PYTHON TORCH_VERSION [WORKDIR]}
torch_version=${2:?usage: bash scripts/compat_check.sh PYTHON TORCH_VERSION [WORKDIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${3:-$(mktemp -d)}
mkdir -p "$work"
echo "compat_check: $("$python" --version), torch $torch_version, in $work"

"$python" -m venv "$work/venv"
venv_python=$work/venv/bin/python
# setuptools >= 77 reads pyproject.toml's SPDX license (a fresh venv may have an older one).
"$venv_python" -m pip install -q "torch==$torch_version" numpy pytest pytest-timeout ninja \
  "setuptools>=77" wheel safetensors

git clone -q "$root" "$work/src"
(cd "$work/src" && GAM_EXT_SKIP_CUDA=1 "$venv_python" -m pip install -q --no-build-isolation .)

# From outside the source tree, so that the installed gam_ext is the one imported.
cd "$work"
tests=()
for name in api cpu_ops compile_opcheck model step_ops generation higher_order pretrained reference; do
  tests+=("$work/src/python_tests/test_$name.py")
done
"$venv_python" -m pytest -q -p no:cacheprovider --rootdir "$work/src" "${tests[@]}" 2>&1 | tail -n 3

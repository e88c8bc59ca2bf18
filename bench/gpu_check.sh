#!/usr/bin/env bash
# GPU check (issue 19): GRPO on a random model of Qwen2.5-0.5B's shape in bf16 on one GPU, a few iterations each
# of rewardlab with generation.engine=native, rewardlab with generation.engine=generate, and TRL's GRPOTrainer on
# the same work; prints generation tokens/s, seconds per iteration, score + update seconds, peak GPU memory and
# peak resident memory per run (bench/real_shape.py does the work; its last line is one JSON object).
# Sized to finish in under 8 minutes on an H200.
#
# The GPU image has torch, transformers, accelerate, peft, tokenizers, safetensors, typer, rich, sacrebleu and
# pyarrow, but not trl, datasets, hydra-core, omegaconf, math-verify, matplotlib (nor rewardlab). Their wheels (pinned below:
# the versions tested with transformers 5.17) and rewardlab's own are fetched here into bench/gpu_wheels/
# (ignored by git) and carried with the run; only those missing there, or older there, are installed, into a
# temporary folder on PYTHONPATH:
#
#   bash bench/gpu_check.sh --prepare                    # here, with PyPI: fills bench/gpu_wheels/ (~30 MiB)
#   bash bench/gpu_check.sh --prepare --python-version 3.12   # if the GPU machine's Python is 3.12
#   run(command="bash bench/gpu_check.sh", carry=["bench/gpu_wheels"], timeout_s=540)    # on the GPU machine
#   bash bench/gpu_check.sh --device cpu --shape small --max-new-tokens 16 --iterations 2  # the logic, on CPU
#
# Options: --device cuda|cpu (cuda), --shape 0.5b|1.5b|small (0.5b), --iterations N (3), --max-new-tokens N (256),
# --wheels DIR (bench/gpu_wheels), --python-version X.Y (with --prepare: the GPU machine's Python; default: this
# one's). Anything after `--` goes to bench/real_shape.py. $PYTHON picks the interpreter (default: python3).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=cuda SHAPE=0.5b ITERATIONS=3 MAX_NEW_TOKENS=256 WHEELS=bench/gpu_wheels PREPARE=0 PYVER=
while [[ $# -gt 0 ]]; do
  case $1 in
    --prepare) PREPARE=1 ;;
    --device) DEVICE=$2; shift ;;
    --shape) SHAPE=$2; shift ;;
    --iterations) ITERATIONS=$2; shift ;;
    --max-new-tokens) MAX_NEW_TOKENS=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --python-version) PYVER=$2; shift ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# Pure-Python packages (one wheel fits every Python 3), version-specific ones, and sdist-only ones built here.
PURE="trl==1.16.0 datasets==5.2.0 hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0
      dill==0.4.1 python-dateutil==4.0.0 huggingface_hub==1.33.0 cycler==0.12.1 pyparsing==3.3.3 fonttools==4.68.0"
# matplotlib: rewardlab/report.py imports it at the top, and every rewardlab module is imported to register schemas
PER_PYTHON="pandas==3.1.1 xxhash==4.1.0 multiprocess==0.70.19 matplotlib==3.11.2 contourpy==1.3.3 kiwisolver==1.5.1
            pillow==13.0.0"
BUILT="antlr4-python3-runtime==4.9.3"
MAX_MIB=48  # what a run may carry is 64 MiB with the working tree

if [[ $PREPARE == 1 ]]; then
  PYVER=${PYVER:-$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation py --abi none \
    --platform any -d "$WHEELS" $PURE
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $PER_PYTHON
  # rewardlab's wheel is the tree as it is now; setuptools' warnings go to a log unless the build fails
  "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" $BUILT . 2>"$WHEELS/build.log" || { cat "$WHEELS/build.log"; exit 1; }
  rm "$WHEELS/build.log"
  echo "$PYVER" > "$WHEELS/PYTHON_VERSION"
  ls -s --block-size=K "$WHEELS"
  size=$(du -sm "$WHEELS" | cut -f1)
  echo "$WHEELS: ${size} MiB for Python $PYVER (limit ${MAX_MIB} MiB)"
  [[ $size -le $MAX_MIB ]] || { echo "error: $WHEELS is over ${MAX_MIB} MiB" >&2; exit 1; }
  exit 0
fi

[[ -f $WHEELS/PYTHON_VERSION ]] || { echo "error: no wheels in $WHEELS: run bash $0 --prepare first" >&2; exit 2; }
began=$SECONDS
SITE=$(mktemp -d)/site
# The carried wheels that are missing here, pure-Python ones also when older here; rewardlab always (the tree
# under test).
mapfile -t wanted < <("$PYTHON" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

def key(v):
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, carried = wheel.name.split("-")[:2]
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = None
    pure = wheel.name.endswith("-py3-none-any.whl")
    if name == "rewardlab" or installed is None or (pure and key(installed) < key(carried)):
        print(wheel)
EOF
)
echo "installing ${#wanted[@]} wheels into $SITE: ${wanted[*]##*/}"
if [[ ${#wanted[@]} -gt 0 ]] && ! PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-deps --no-index \
    --target "$SITE" "${wanted[@]}"; then
  echo "error: installing the wheels failed; they are for Python $(cat "$WHEELS/PYTHON_VERSION"), this is" \
       "$("$PYTHON" -V): if that differs, run bash $0 --prepare --python-version X.Y where PyPI is reachable" >&2
  exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# from outside the repository, whose rewardlab/ (no cli/, conf/) would shadow the installed wheel
(cd "$(dirname "$SITE")" && "$PYTHON" - "$DEVICE") <<'EOF'
import sys
from importlib.metadata import version

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| transformers", version("transformers"),
      "| trl", version("trl"), "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
if sys.argv[1].startswith("cuda") and not torch.cuda.is_available():
    sys.exit("error: --device cuda but torch sees no GPU")
import datasets, hydra, math_verify, trl  # noqa: E401,F401  (fail here, not minutes later)
import rewardlab.run  # noqa: F401
EOF
echo "setup took $((SECONDS - began)) s"

"$PYTHON" bench/real_shape.py --device "$DEVICE" --shape "$SHAPE" --engines native,generate \
  --iterations "$ITERATIONS" --max-new-tokens "$MAX_NEW_TOKENS" --prompts 4 --group 8 --micro-batch 32 \
  --repeats 1 "$@"
echo "gpu_check took $((SECONDS - began)) s"

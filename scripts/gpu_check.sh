#!/usr/bin/env bash
# One command for a GPU machine with a fresh copy of the repository (no internet; torch with CUDA
# and nvcc preinstalled): builds gam_ext with its CUDA kernels for the local GPU only, runs each
# kernel path once in its own process under a time limit (the smoke stage: a path that hangs or
# fails there is left out of every later stage, GAM_CHECK_BROKEN), runs the CUDA and build tests,
# compute-sanitizer memcheck on a small case of every kernel, the kernel benchmark, an Nsight
# Compute summary of the retrieval and fused-mixer kernels (and the SASS instructions where the
# seesaw forward and the backward's score kernel stall), racecheck on the kernels that use shared
# memory, the op benchmark (with fp32's two retrieval paths), a kernel-time breakdown of the mixer
# on each of its paths, and the scaling and generation benchmarks, and writes
# benchmarks/results/<device>-<date>.md, each stage with its result and wall time. Each stage has
# a time limit so that a call fits its budget (GAM_CHECK_BUDGET_S) and the report is always
# written. On a machine without a usable GPU it stops at once and writes nothing.
#   bash scripts/gpu_check.sh
# Knobs: PYTHON (default .venv/bin/python where it exists, else python3), GAM_CHECK_BUDGET_S (the
# whole check, seconds; default 450), GAM_CHECK_LOG_DIR (keep every stage's full log there),
# GAM_CHECK_PART: unset or "all" runs every stage; "1" the build, tests, sanitizers, kernel
# benchmark and ncu (about 5 minutes on an H200), "2" the rest (op benchmarks, mixer breakdown,
# scaling, generation), building first only where this checkout has no CUDA build yet: the whole
# check in two calls of a device session (part 2 on the warm machine, the build of part 1 kept),
# each within its budget and with its own report (part 2's named <device>-<date>-part2.md).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if ! ARCH=$("$PY" -c "import torch; assert torch.cuda.is_available(); print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null); then
  echo "gpu_check.sh: $PY sees no CUDA GPU (torch.cuda.is_available() is False or torch is missing);" \
       "this check needs a GPU machine. Nothing was built or written." >&2
  exit 2
fi
# The stage scripts import gam_ext from this checkout (built in place below).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# setup.py finds the toolkit from nvcc; name it when nvcc is a wrapper outside the toolkit.
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc && -d /usr/local/cuda/lib64 ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
PART=${GAM_CHECK_PART:-all}
if [[ $PART != all && $PART != 1 && $PART != 2 ]]; then
  echo "gpu_check.sh: GAM_CHECK_PART must be all, 1 or 2, got '$PART'" >&2
  exit 2
fi
in_part() { [[ $PART == all || $PART == "$1" ]]; }  # whether this call runs part $1's stages
SKIPPED="skipped (GAM_CHECK_PART=$PART)"
START=$(date +%s)
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
SLUG=$(echo "$DEVICE" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//')
DATE=$(date -u +%Y-%m-%d)
mkdir -p benchmarks/results
OUT="benchmarks/results/${SLUG}-${DATE}$([[ $PART == 2 ]] && echo -part2).md"
LOG=${GAM_CHECK_LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG"

NOT_RUN=200  # a stage's exit code when GAM_CHECK_PART leaves it out
status() {  # stage name, exit code
  if [[ $2 -eq 0 ]]; then echo "ok"; elif [[ $2 -eq 124 ]]; then echo "TIMEOUT"
  elif [[ $2 -eq $NOT_RUN ]]; then echo "$SKIPPED"
  elif [[ $2 -eq 127 ]]; then echo "not run (command not found)"; else echo "FAILED (rc=$2)"; fi
}
smoke_status() {  # exit code: 1 means it ran, and some path was not ok (its table says which)
  if [[ $1 -eq 1 ]]; then echo "ran: not every path ok (the table below)"; else status smoke "$1"; fi
}
sanitizer_status() {  # log file, exit code: the status, and on a timeout the last group done
  local st; st=$(status san "$2")
  if [[ $2 -eq 124 ]]; then
    local last; last=$(grep -o "cuda_sanitize_driver: .* done ([0-9]* s)" "$1" 2>/dev/null | tail -1)
    st="$st (${last:-no case group finished})"
  fi
  echo "$st"
}
elapsed() { echo $(( $(date +%s) - START ))s; }
declare -A SECS  # each stage's wall time, for the report
STAGE_START=$(date +%s)
took() {  # stage name: the time since the previous stage ended (a skipped stage takes none)
  SECS[$1]=$(( $(date +%s) - STAGE_START ))s
  STAGE_START=$(date +%s)
}
timed() {  # stage name, status text: the status with the stage's time
  echo "$2${SECS[$1]:+ (${SECS[$1]})}"
}
BUDGET=${GAM_CHECK_BUDGET_S:-450}  # the whole check, seconds
limit() {  # a stage's time limit: its own cap, or what is left of the budget
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
  (( left < 5 )) && left=5
  echo $(( $1 < left ? $1 : left ))
}

# On sm_90 the arch-specific target, whose code has wgmma (GAM_EXT_RETRIEVAL=wgmma's kernels),
# where this torch's extension builder knows it (else plain 9.0, without wgmma).
BUILD_ARCH=$ARCH
if [[ $ARCH == 9.0 ]] && TORCH_CUDA_ARCH_LIST=9.0a "$PY" -c \
  "from torch.utils.cpp_extension import _get_cuda_arch_flags as flags; assert 'sm_90a' in str(flags())" \
  > /dev/null 2>&1; then
  BUILD_ARCH=9.0a
fi
# Part 2 builds only where this checkout has no CUDA build yet (part 1's is kept on the machine).
BUILT_CHECK="import gam_ext; assert gam_ext.backend_info()['ops']['cuda']['memory_retrieval'] == 'kernel'"
if [[ $PART == 2 ]] && "$PY" -c "$BUILT_CHECK" > /dev/null 2>&1; then
  echo "== build: this checkout's CUDA build, kept"
  echo "kept: the CUDA build already in this checkout" > "$LOG/build.txt"
  BUILD_RC=0 BUILD_KEPT=1
else
  echo "== build (arch $BUILD_ARCH)"
  TORCH_CUDA_ARCH_LIST="$BUILD_ARCH" MAX_JOBS=16 GAM_EXT_FORCE_CUDA=1 \
    timeout $(limit 300) "$PY" setup.py build_ext --inplace > "$LOG/build.txt" 2>&1
  BUILD_RC=$?
fi
took build
tail -5 "$LOG/build.txt"

# A first run of every kernel path (scripts/cuda_smoke.py: each path in its own process under a
# time limit, in seconds) before any stage spends minutes on one: the paths it finds hanging or
# failing are left out of every later stage (GAM_CHECK_BROKEN, read by the test suite's conftest,
# the sanitizer driver and the benchmarks), since a hung kernel would hold each stage that runs
# it to its time limit and a CUDA error ends the process that meets it.
echo "== smoke"
timeout $(limit 150) "$PY" scripts/cuda_smoke.py --time-limit 60 > "$LOG/smoke.md" 2>&1
SMOKE_RC=$?
took smoke
tail -n 12 "$LOG/smoke.md"
GAM_CHECK_BROKEN=$(sed -n 's/^broken: //p' "$LOG/smoke.md" | tail -1)
[[ $GAM_CHECK_BROKEN == none ]] && GAM_CHECK_BROKEN=""
export GAM_CHECK_BROKEN
broken() { [[ " $GAM_CHECK_BROKEN " == *" $1 "* ]]; }
# Without the fused mixer op, the stages that run GAMBlock as a user would get the three ops.
broken mixer && export GAM_EXT_BACKEND=unfused
# The stages that run GAM_EXT_RETRIEVAL=wgmma without naming a forward get a working one, and the
# wgmma path runs only where a forward and the backward work (else ncu profiles the gemm path).
WGMMA_OK=""
if ! broken wgmma-backward; then
  for forward in pipelined lockstep seesaw; do
    broken "wgmma-$forward" && continue
    WGMMA_OK=1
    [[ $forward != pipelined ]] && export GAM_EXT_WGMMA_FORWARD=$forward
    break
  done
fi

TESTS="python_tests/test_cuda.py python_tests/test_cuda_wgmma.py python_tests/test_build.py"
TEST_RC=$NOT_RUN
if in_part 1; then
  echo "== pytest (CUDA kernels, wgmma primitives on sm_90, build)"
  timeout $(limit 150) "$PY" -m pytest $TESTS -q -p no:cacheprovider > "$LOG/pytest.txt" 2>&1
  TEST_RC=$?
  took tests
  tail -15 "$LOG/pytest.txt"
fi

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
MEM_RC=127; RACE_RC=127
in_part 1 || { MEM_RC=$NOT_RUN; RACE_RC=$NOT_RUN; }
if [[ -n "$SAN" ]] && in_part 1; then
  echo "== compute-sanitizer memcheck"
  timeout $(limit 75) "$SAN" --tool memcheck --error-exitcode 1 "$PY" scripts/cuda_sanitize_driver.py \
    > "$LOG/memcheck.txt" 2>&1
  MEM_RC=$?
  took memcheck
  tail -n 3 "$LOG/memcheck.txt"
fi

BENCH_ARGS="--batch 16 --dim 512 --slots 512 --seqlens 256,1024,4096,8192 --dtype bf16"
KB_RC=$NOT_RUN
if in_part 1; then
  echo "== kernel benchmark"
  timeout $(limit 100) "$PY" benchmarks/cuda_kernel_bench.py $BENCH_ARGS > "$LOG/kernels.md" 2>&1
  KB_RC=$?
  took kernels
fi

# Nsight Compute on the retrieval and fused-mixer kernels of one bf16 GAMBlock training step
# (B=16 N=2048 D=S=512) on the fused mixer (GAM_EXT_BACKEND=fused: its epilogue, prologue and dh
# sum) with the wgmma retrieval kernels (GAM_EXT_RETRIEVAL=wgmma; on other GPUs the default
# path's), clocks left as found. Needs hardware counters (not available on every machine). It
# runs right after the kernel benchmark, before the stages that earlier runs measured already,
# so that a tight budget cuts those first.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
NCU_RC=127
in_part 1 || NCU_RC=$NOT_RUN
# --print-details all: the sections' bodies too, e.g. the warp-stall breakdown, which the
# summary lines leave out.
NCU_ARGS="--clock-control none --profile-from-start off -k regex:retrieval|mixer --set full --print-details all"
PROFILE_ARGS="--dtype bf16 --batch 16 --seqlen 2048 --d-model 512 --slots 512 --warmup 1 --steps 1"
# Then one launch of the seesaw forward (GAM_EXT_WGMMA_FORWARD=seesaw), which the step above does
# not run, into its own log.
NCU_SEESAW_ARGS="--clock-control none --profile-from-start off -k regex:seesaw -c 1 --set full --print-details all"
# Then where the warps of the two kernels that matter most stall, per SASS instruction: the seesaw
# forward and the backward's score kernel, PC sampling only (few passes), saved as a report and
# printed from it as the source page (the report excerpt lists the top instructions). Its result
# does not change the stage's: the excerpts above come from the first two calls.
NCU_SOURCE_ARGS="--clock-control none --profile-from-start off -k regex:seesaw|bwd_scores -c 2 --section SourceCounters --section WarpStateStats"
NCU_SOURCE_RC=$NOT_RUN
# Paths the smoke stage found broken are left out: the fused mixer (then the three ops), the
# wgmma path (then the gemm path's kernels), the seesaw forward (then its passes, or its half of
# the source pass).
NCU_BACKEND=$(broken mixer && echo unfused || echo fused)
NCU_RETRIEVAL=$([[ -n $WGMMA_OK ]] && echo wgmma || echo gemm)
NCU_ENV="GAM_EXT_BACKEND=$NCU_BACKEND GAM_EXT_RETRIEVAL=$NCU_RETRIEVAL${GAM_EXT_WGMMA_FORWARD:+ GAM_EXT_WGMMA_FORWARD=$GAM_EXT_WGMMA_FORWARD}"
SEESAW_OK=$([[ -n $WGMMA_OK ]] && ! broken wgmma-seesaw && echo 1)
[[ -z $SEESAW_OK ]] && NCU_SOURCE_ARGS=${NCU_SOURCE_ARGS/"-k regex:seesaw|bwd_scores -c 2"/"-k regex:bwd_scores -c 1"}
if [[ -n "$NCU" ]] && in_part 1; then
  echo "== ncu"
  env $NCU_ENV timeout $(limit 90) "$NCU" $NCU_ARGS "$PY" benchmarks/profile_steps.py \
    $PROFILE_ARGS > "$LOG/ncu.txt" 2>&1
  NCU_RC=$?
  if [[ $NCU_RC -eq 0 && -n $SEESAW_OK ]]; then
    env $NCU_ENV GAM_EXT_WGMMA_FORWARD=seesaw timeout $(limit 45) "$NCU" \
      $NCU_SEESAW_ARGS "$PY" benchmarks/profile_steps.py $PROFILE_ARGS > "$LOG/ncu_seesaw.txt" 2>&1
    NCU_RC=$?
  fi
  if [[ $NCU_RC -eq 0 && -n $WGMMA_OK ]]; then
    rm -f "$LOG/ncu_source.ncu-rep"
    env $NCU_ENV $([[ -n $SEESAW_OK ]] && echo GAM_EXT_WGMMA_FORWARD=seesaw) timeout $(limit 45) "$NCU" \
      $NCU_SOURCE_ARGS -o "$LOG/ncu_source" "$PY" benchmarks/profile_steps.py $PROFILE_ARGS \
      > "$LOG/ncu_source.txt" 2>&1 \
      && timeout $(limit 30) "$NCU" --import "$LOG/ncu_source.ncu-rep" --page source --print-source sass --csv \
      > "$LOG/ncu_source.csv" 2>> "$LOG/ncu_source.txt"
    NCU_SOURCE_RC=$?
  fi
  took ncu
fi

# racecheck checks shared memory only: the driver's groups whose kernels use it (the wgmma
# kernels' first). It is the slowest tool, so it runs after the stages that measure the newest
# kernels.
if [[ -n "$SAN" ]] && in_part 1; then
  echo "== compute-sanitizer racecheck"
  timeout $(limit 100) "$SAN" --tool racecheck --error-exitcode 1 "$PY" scripts/cuda_sanitize_driver.py \
    --shared-memory-only > "$LOG/racecheck.txt" 2>&1
  RACE_RC=$?
  took racecheck
  tail -n 3 "$LOG/racecheck.txt"
fi

# Part 2's stages, the benchmarks.
OPS_RC=$NOT_RUN FP32_RC=$NOT_RUN BREAKDOWN_RC=$NOT_RUN SCALING_RC=$NOT_RUN GENERATE_RC=$NOT_RUN
# The shared op benchmark (providers gam_ext / gam_unfused (mixer) / eager / compile / sdpa /
# gam_fused (retrieval)).
OPS_ARGS="--device cuda --dtype bfloat16 --batch 16 --d-model 512 --slots 512 --kernel-size 3 \
--seqlen 256 1024 4096 8192 --max-seconds 1 --out benchmarks/results/${SLUG}-${DATE}-ops"
if in_part 2; then
  echo "== op benchmark"
  timeout $(limit 200) "$PY" benchmarks/bench_ops.py $OPS_ARGS > "$LOG/ops.md" 2>&1
  OPS_RC=$?
  took ops
fi

# fp32 on the GPU: the default gemm path (cuBLAS fp32 products around gam_ext's softmax kernels)
# against the fused path's fp32 SIMT kernels (gam_fused) and eager, for the retrieval, and the mixer
# against eager: the data behind fp32's default path (csrc/cuda/README.md, "Retrieval paths").
FP32_ARGS="--device cuda --dtype float32 --batch 16 --d-model 512 --slots 512 --kernel-size 3 \
--seqlen 1024 4096 --ops retrieval mixer --modes fwd fwdbwd --providers gam_ext gam_fused eager \
--max-seconds 0.5 --no-memory --out benchmarks/results/${SLUG}-${DATE}-fp32-ops"
if in_part 2; then
  echo "== op benchmark, fp32 paths"
  timeout $(limit 60) "$PY" benchmarks/bench_ops.py $FP32_ARGS > "$LOG/ops-fp32.md" 2>&1
  FP32_RC=$?
  took fp32
fi

# Where each mixer path spends its time: torch.profiler's kernels of the block's token mixer,
# fwd+bwd (bf16 autocast, B=16 N=8192 D=S=512), on the three-op path and on the fused op.
BREAKDOWN_ARGS="--what mixer --torch-profiler --dtype bf16 --batch 16 --seqlen 8192 --d-model 512 \
--slots 512 --warmup 2 --steps 3"
if in_part 2; then
  echo "== mixer breakdown"
  BREAKDOWN_RC=0
  for backend in unfused $(broken mixer || echo fused); do
    GAM_EXT_BACKEND=$backend timeout $(limit 45) "$PY" benchmarks/profile_steps.py $BREAKDOWN_ARGS \
      > "$LOG/breakdown-$backend.txt" 2>&1 || BREAKDOWN_RC=$?
  done
  took breakdown
fi

# The paper's Table 2 on this GPU: one block fwd+bwd against N, GAM vs attention vs Mamba (bf16,
# a shorter grid than the script's default so that it fits the budget).
SCALING_ARGS="--device cuda --dtype bf16 --seqlen 512 2048 8192 --repeats 5 --max-seconds 0.3 \
--out benchmarks/results/${SLUG}-${DATE}-scaling"
if in_part 2; then
  echo "== scaling"
  timeout $(limit 120) "$PY" benchmarks/bench_scaling.py $SCALING_ARGS > "$LOG/scaling.txt" 2>&1
  SCALING_RC=$?
  took scaling
fi

# Text generation per new token against the context: GAM's recurrent step, the full recompute and
# a Transformer KV cache (bf16, batch 8, a shorter grid than the script's default).
GENERATE_ARGS="--device cuda --dtype bf16 --batch 8 --d-model 512 --slots 512 --contexts 64 1024 8192 \
--tokens 32 --passes 1 --out benchmarks/results/${SLUG}-${DATE}-generate"
if in_part 2; then
  echo "== generation"
  timeout $(limit 90) "$PY" benchmarks/bench_generate.py $GENERATE_ARGS > "$LOG/generate.txt" 2>&1
  GENERATE_RC=$?
  took generation
fi

{
  echo "# GPU check: $DEVICE, $DATE"
  echo
  echo "- device: $DEVICE (sm_${ARCH/./}), $(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo "- torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), $(nvcc --version 2>/dev/null | tail -1)"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git status --porcelain \
    --untracked-files=no -- . ':!benchmarks/results' 2>/dev/null | grep -q . && echo ', with uncommitted changes')"
  echo "- command: \`$([[ $PART != all ]] && echo "GAM_CHECK_PART=$PART ")bash scripts/gpu_check.sh\` (total $(elapsed))"
  echo
  echo "| stage | command | result |"
  echo "|---|---|---|"
  echo "| build | TORCH_CUDA_ARCH_LIST=$BUILD_ARCH MAX_JOBS=16 GAM_EXT_FORCE_CUDA=1 $PY setup.py build_ext --inplace | $([[ -n ${BUILD_KEPT:-} ]] && echo "not run: this checkout's CUDA build kept" || timed build "$(status build $BUILD_RC)") |"
  echo "| smoke | $PY scripts/cuda_smoke.py --time-limit 60 | $(timed smoke "$(smoke_status $SMOKE_RC)$([[ -n $GAM_CHECK_BROKEN ]] && echo ": left out of the later stages: $GAM_CHECK_BROKEN")") |"
  echo "| tests | $PY -m pytest $TESTS | $(timed tests "$(status tests $TEST_RC)$([[ $TEST_RC -ne $NOT_RUN ]] && echo ": $(tail -1 "$LOG/pytest.txt")")") |"
  echo "| memcheck | compute-sanitizer --tool memcheck $PY scripts/cuda_sanitize_driver.py | $(timed memcheck "$(sanitizer_status "$LOG/memcheck.txt" $MEM_RC)") |"
  echo "| kernel bench | $PY benchmarks/cuda_kernel_bench.py $BENCH_ARGS | $(timed kernels "$(status kb $KB_RC)") |"
  echo "| ncu | $NCU_ENV ncu $NCU_ARGS $PY benchmarks/profile_steps.py $PROFILE_ARGS$([[ -n $SEESAW_OK ]] && echo "; then with GAM_EXT_WGMMA_FORWARD=seesaw, ncu $NCU_SEESAW_ARGS") | $(timed ncu "$(status ncu $NCU_RC)") |"
  echo "| racecheck | compute-sanitizer --tool racecheck $PY scripts/cuda_sanitize_driver.py --shared-memory-only | $(timed racecheck "$(sanitizer_status "$LOG/racecheck.txt" $RACE_RC)") |"
  echo "| op bench | $PY benchmarks/bench_ops.py ${OPS_ARGS:-(missing)} | $(timed ops "$(status ops $OPS_RC)") |"
  echo "| fp32 paths | $PY benchmarks/bench_ops.py $FP32_ARGS | $(timed fp32 "$(status fp32 $FP32_RC)") |"
  echo "| mixer breakdown | GAM_EXT_BACKEND=unfused, then fused: $PY benchmarks/profile_steps.py $BREAKDOWN_ARGS | $(timed breakdown "$(status breakdown $BREAKDOWN_RC)") |"
  echo "| scaling | $PY benchmarks/bench_scaling.py $SCALING_ARGS | $(timed scaling "$(status scaling $SCALING_RC)") |"
  echo "| generation | $PY benchmarks/bench_generate.py $GENERATE_ARGS | $(timed generation "$(status generate $GENERATE_RC)") |"
  echo
  echo "Targets (H100/H200, bf16, B=16 D=S=512, N=1024..8192): conv fwd/bwd >= 70% of HBM bandwidth,"
  echo "gate >= 80%; retrieval fwd >= 1.5x eager and >= 45% of the bf16 dense peak, bwd >= 1.3x eager,"
  echo "fwd+bwd >= 1.2x the gemm path (GAM_EXT_RETRIEVAL=gemm); mixer fwd+bwd >= 2.5x eager."
  echo
  echo "Retrieval kernels at S=D=512, bf16 (gam_ext.backend_info): $("$PY" -c 'import torch, gam_ext; print(gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))["retrieval"]["cuda"])' 2>&1 | tail -1)"
  echo
  echo "The same with GAM_EXT_RETRIEVAL=wgmma: $(GAM_EXT_RETRIEVAL=wgmma "$PY" -c 'import torch, gam_ext; print(gam_ext.backend_info(retrieval=(512, 512, torch.bfloat16))["retrieval"]["cuda"])' 2>&1 | tail -1)"
  echo
  echo "## Smoke: a first run of each kernel path (scripts/cuda_smoke.py)"; echo
  grep -E "^\||^broken:|^every path" "$LOG/smoke.md" || { echo '```'; tail -20 "$LOG/smoke.md"; echo '```'; }
  echo
  # Each section from this call's stages only (a log folder kept across the two parts holds both).
  if in_part 1; then echo "## Kernel figures"; echo; cat "$LOG/kernels.md"; fi
  if in_part 2 && [[ -f "$LOG/ops.md" ]]; then echo; echo "## bench_ops.py"; echo; cat "$LOG/ops.md"; fi
  if in_part 2 && [[ -f "$LOG/ops-fp32.md" ]]; then
    echo; echo "## bench_ops.py, fp32: the default (gemm) retrieval against the fp32 SIMT kernels"; echo
    cat "$LOG/ops-fp32.md"
  fi
  for backend in unfused fused; do
    if in_part 2 && [[ -f "$LOG/breakdown-$backend.txt" ]]; then
      echo; echo "## Mixer kernels per step, backend $backend (profile_steps.py --what mixer)"; echo
      grep -E "ms/step" "$LOG/breakdown-$backend.txt"; echo
      sed -n '/^| kernel /,/^| \*\*all/p' "$LOG/breakdown-$backend.txt"
      grep -qE "^\| \*\*all" "$LOG/breakdown-$backend.txt" || { echo '```'; tail -15 "$LOG/breakdown-$backend.txt"; echo '```'; }
    fi
  done
  GENERATE_MD="benchmarks/results/${SLUG}-${DATE}-generate.md"
  if ! in_part 2; then
    :
  elif [[ -f "$GENERATE_MD" ]]; then
    echo; echo "## bench_generate.py ($GENERATE_MD, with a plot beside it)"; echo
    sed -n '/^|/p' "$GENERATE_MD"
  elif [[ -f "$LOG/generate.txt" ]]; then
    echo; echo "## bench_generate.py (tail)"; echo '```'; tail -20 "$LOG/generate.txt"; echo '```'
  fi
  SCALING_MD="benchmarks/results/${SLUG}-${DATE}-scaling.md"
  if ! in_part 2; then
    :
  elif [[ -f "$SCALING_MD" ]]; then
    echo; echo "## bench_scaling.py ($SCALING_MD, with a plot beside it)"; echo
    sed -n '/^## bf16/,/^## The paper/p' "$SCALING_MD" | sed '$d'
  elif [[ -f "$LOG/scaling.txt" ]]; then
    echo; echo "## bench_scaling.py (tail)"; echo '```'; tail -20 "$LOG/scaling.txt"; echo '```'
  fi
  if in_part 1 && [[ -f "$LOG/ncu.txt" ]]; then
    echo; echo "## Nsight Compute, retrieval and fused-mixer kernels (excerpt)"; echo; echo '```'
    grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Registers Per Thread|Dynamic Shared Memory Per Block|Theoretical Occupancy|Achieved Occupancy|==ERROR==|==WARNING==" \
      "$LOG/ncu.txt" | head -120
    echo '```'
    if grep -qiE "stall" "$LOG/ncu.txt"; then
      echo; echo "Warp stalls (ncu section details, lines naming a stall):"; echo; echo '```'
      grep -E "^  [a-z_]+.*\(|[Ss]tall" "$LOG/ncu.txt" | head -150
      echo '```'
    fi
  fi
  if in_part 1 && [[ -f "$LOG/ncu_seesaw.txt" ]]; then
    echo; echo "## Nsight Compute, the seesaw wgmma forward (excerpt)"; echo; echo '```'
    grep -E "^  [a-z_]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per Thread|Dynamic Shared Memory Per Block|Achieved Occupancy|[Ss]tall|==ERROR==|==WARNING==" \
      "$LOG/ncu_seesaw.txt" | head -60
    echo '```'
  fi
  if in_part 1 && [[ $NCU_SOURCE_RC -ne $NOT_RUN ]]; then
    echo; echo "## Nsight Compute, where the warps stall (SASS, seesaw forward and backward score kernel)"; echo
    echo "\`$NCU_ENV$([[ -n $SEESAW_OK ]] && echo " GAM_EXT_WGMMA_FORWARD=seesaw") ncu $NCU_SOURCE_ARGS -o ncu_source\`, then \`ncu --import ncu_source.ncu-rep --page source --print-source sass --csv\`: $(status ncu "$NCU_SOURCE_RC")"; echo
    if [[ -s "$LOG/ncu_source.csv" ]]; then
      "$PY" scripts/ncu_source_top.py "$LOG/ncu_source.csv" --top 25 2>&1
    else
      echo '```'; tail -20 "$LOG/ncu_source.txt" 2>/dev/null; echo '```'
    fi
  fi
  if [[ $TEST_RC -ne 0 && $TEST_RC -ne $NOT_RUN ]]; then echo; echo "## pytest output (tail)"; echo '```'; tail -60 "$LOG/pytest.txt"; echo '```'; fi
  if [[ $BUILD_RC -ne 0 ]]; then echo; echo "## build output (tail)"; echo '```'; tail -40 "$LOG/build.txt"; echo '```'; fi
  for t in memcheck racecheck; do
    if in_part 1 && [[ -f "$LOG/$t.txt" ]] && ! grep -qE "ERROR SUMMARY: 0 errors|SUMMARY: 0 hazards displayed \(0 errors" "$LOG/$t.txt"; then
      echo; echo "## $t (tail)"; echo '```'; tail -40 "$LOG/$t.txt"; echo '```'
    fi
  done
} > "$OUT"
echo "== wrote $OUT ($(elapsed))"
cat "$OUT"

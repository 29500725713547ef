#!/usr/bin/env bash
# The multi-GPU checks of a decode group, for a machine with 2 or more GPUs (a multi-GPU kind such as
# nvidia-h200-x2 or nvidia-h200-x4): tests/gpu/multi (exactness of groups of 2 and 4 GPUs across CP degrees and
# placements, and the placement policies through the service) and bench/group_step_gpu.py (group step with graphs
# and eager, exposed CP exchange and MoE route per layer, against the GPU-to-GPU copy bandwidth). Groups larger than
# the machine's GPU count are skipped. Every rank of a group is its own process on its own GPU (rank r on cuda:r,
# NCCL between them) and leaves with os._exit after a barrier; each part runs under `timeout`.
#
#   scripts/multi_gpu.sh KIND [all|tests|bench] [flags of that part...]
#   scripts/multi_gpu.sh nvidia-h200-x4                    # both, results in bench/results/group_step_gpu_KIND.json
#   scripts/multi_gpu.sh nvidia-h200-x4 tests -k 4-gpus    # the tests alone, groups of 4 only (pytest flags)
#   scripts/multi_gpu.sh nvidia-h200-x4 bench --sizes 2    # the bench alone, groups of 2 only (its flags)
#   scripts/multi_gpu.sh cpu                               # the same plumbing on CPU processes (gloo), results to /tmp
#
# On the project's device machine carry .gpu, nanocp/v1 and nanocp/internal (README, "GPUs"); .gpu's archives are
# unpacked here on first use. TESTS_TIMEOUT_S and BENCH_TIMEOUT_S bound each part (default 540 s each).
set -euo pipefail
cd "$(dirname "$0")/.."

kind=${1:?usage: scripts/multi_gpu.sh KIND [all|tests|bench] [flags of that part...]}
what=${2:-all}
shift $(($# < 2 ? $# : 2))
case "$what" in
    all) [ $# -eq 0 ] || { echo "scripts/multi_gpu.sh: flags go to one part: tests or bench" >&2; exit 2; } ;;
    tests | bench) ;;
    *) echo "scripts/multi_gpu.sh: the part is all, tests or bench, not $what" >&2; exit 2 ;;
esac
tests_timeout=${TESTS_TIMEOUT_S:-540}
bench_timeout=${BENCH_TIMEOUT_S:-540}

if [ "$kind" = cpu ]; then
    python=${PYTHON:-.venv/bin/python}
    export NANOCP_MULTI_DEVICE=cpu
    tests_args=(-q -p no:cacheprovider)
    bench_args=(--device cpu)
else
    python=${PYTHON:-python3}
    if [ -f .gpu/site.tar.xz ] && [ ! -d .gpu/site ]; then
        mkdir -p .gpu/site && xz -dc .gpu/site.tar.xz | tar -xf - -C .gpu/site
    fi
    if [ -f .gpu/service.tar.xz ] && [ ! -d .gpu/service ]; then
        mkdir -p .gpu/service && xz -dc .gpu/service.tar.xz | tar -xf - -C .gpu/service
    fi
    export PYTHONPATH=$PWD/.gpu/site:$PWD/.gpu/service:$PWD${PYTHONPATH:+:$PYTHONPATH}
    export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a}
    gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
    if [ "$gpus" -lt 2 ]; then
        echo "scripts/multi_gpu.sh: needs 2 or more CUDA GPUs, this machine has $gpus" >&2
        exit 2
    fi
    echo "$gpus GPUs: groups of up to $gpus ranks, one GPU a rank"
    # --noconftest: the CPU suite's fixtures need pytest-asyncio, which the GPU image lacks.
    tests_args=(--noconftest -q -p no:cacheprovider)
    bench_args=(--kind "$kind")
fi

status=0
# Runs a part under timeout, which leads a process group of its own (it kills the whole group when time runs out);
# whatever of that group is left when the part ends (a worker whose test failed) is ended by the group's id.
part() {
    local limit=$1
    shift
    timeout -k 10 "$limit" "$@" &
    local pid=$!
    wait "$pid" || status=$?
    kill -KILL -- "-$pid" 2>/dev/null || true
}
if [ "$what" = all ] || [ "$what" = tests ]; then
    part "$tests_timeout" "$python" -m pytest "${tests_args[@]}" tests/gpu/multi "$@"
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
    part "$bench_timeout" "$python" bench/group_step_gpu.py "${bench_args[@]}" "$@"
fi
exit "$status"

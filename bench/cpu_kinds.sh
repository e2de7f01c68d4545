#!/usr/bin/env bash
# How far the quickstart's numbers move with the CPU kind: the same quickstart run on this machine with the
# pinned kernels (the default) and with the CPU's native ones, side by side, and one small archive holding
# what another machine's runs are compared with (scripts/compare_runs.py): each run folder without its
# weights and data (summary.json, report, commands, logs, the SHA-256 of every weight file), and this CPU.
#
#   bash bench/cpu_kinds.sh [DIR]       # default DIR: ./cpu_kinds_out; the archive: DIR/cpu_kinds.tar.xz
#
# Environment: QUICKSTART_ARGS (default: the BERT `small` preset, 2 seeds, no ablation, no downstream tasks),
# KINDS (default "pinned native"), JOBS (commands at once per run, default: the cores over the number of
# runs), LIMIT (seconds per run, default 3000), PYTHON (default python3). CUDA is hidden from the runs: the
# question is the CPU's arithmetic.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-cpu_kinds_out}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
KINDS=${KINDS:-pinned native}
read -r -a kinds <<<"$KINDS"
CORES=$(nproc)
JOBS=${JOBS:-$(((CORES / ${#kinds[@]}) > 0 ? CORES / ${#kinds[@]} : 1))}
LIMIT=${LIMIT:-3000}
QUICKSTART_ARGS=${QUICKSTART_ARGS:---preset small --family bert --seeds 2 --no_ablation --no_downstream}
# the repository's modules, importable where it is not pip-installed
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=

{
    lscpu
    grep -m1 -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '
    echo
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__); print('cpu capability', torch.backends.cpu.get_cpu_capability()); print(torch.__config__.show())"
} >"$DIR/machine.txt" 2>&1

for kind in "${kinds[@]}"; do
    # shellcheck disable=SC2086
    timeout --kill-after=20 "$LIMIT" "$PY" scripts/quickstart.py $QUICKSTART_ARGS --jobs "$JOBS" --threads 1 \
        --cpu_kernels "$kind" --out "$DIR/$kind" >"$DIR/$kind.log" 2>&1 &
done
wait

for kind in "${kinds[@]}"; do
    [ -d "$DIR/$kind" ] && "$PY" scripts/compare_runs.py --write_digests "$DIR/$kind"
done
if [ ${#kinds[@]} -ge 2 ] && [ -f "$DIR/${kinds[0]}/summary.json" ] && [ -f "$DIR/${kinds[1]}/summary.json" ]; then
    "$PY" scripts/compare_runs.py "$DIR/${kinds[0]}" "$DIR/${kinds[1]}" | tee "$DIR/compare.md"
fi
# everything but the weights, the data and the corpus (their digests and the logs say what they were): a
# run stopped by LIMIT still brings back each finished unit's results
(
    cd "$DIR" || exit 1
    files=(machine.txt ./*.log "${kinds[@]}")
    [ -f compare.md ] && files+=(compare.md)
    tar -cJf cpu_kinds.tar.xz --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.npy' \
        --exclude='*.pickle' --exclude='*/corpus' --exclude='*/data' "${files[@]}"
)
ls -la "$DIR/cpu_kinds.tar.xz"

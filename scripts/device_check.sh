#!/bin/bash
# Accelerator checks in one command per phase, sized for a short GPU lease (see BUILD_NOTES.md,
# "Accelerator runs").
#
# usage (repository root of a GPU host; WHEELS=.whl where the host lacks ml_collections or jaxopt):
#   OUT=runs/device MNIST_DIR=.devdata/mnist WHEELS=.whl bash scripts/device_check.sh attack   # phase A
#   OUT=runs/device MNIST_DIR=.devdata/mnist WHEELS=.whl bash scripts/device_check.sh pool     # phase B
#   OUT=runs/device MNIST_DIR=.devdata/mnist WHEELS=.whl bash scripts/device_check.sh tests    # phase C
#   OUT=runs/device MNIST_DIR=.devdata/mnist WHEELS=.whl bash scripts/device_check.sh sweep    # phase D
#
# Phase "attack": the full 60,000-image attack of the trained FC100-100-10 (scripts/bench/scale.py :full),
# bench/attack.py's convex check, engine-vs-scipy comparison and cold first call (fresh process, no
# compilation cache), and the throughput curve vs batch size
# (scale.py :gpu). Phase "pool": bench/pool_generation.py (refresh cost vs size) and one
# adversarial-training seed with the default config (all three runs). Phase "tests": the attack and
# adversarial-training tests on the accelerator. Phase "sweep": bench/pool_sweep.py (seconds per
# model-epoch alone vs vmapped sweeps), then the three runs for SEEDS (default 0-15) as one program each
# (--config.sweep_seeds; EXTRA adds flags to adversarial_training.py, e.g. "--config.num_val=10000
# --config.runs=('adversarial',)" for a validation screen).
#
# Carry: the MNIST IDX files (MNIST_DIR; with --data_dir no tensorflow-datasets is needed), the trained runs
# MODELS/fc100-100-10 and MODELS/fc10-1e-4 (scripts/train.py; MODELS=runs/models), for phase "pool" the
# final.msgpack of an adversarially trained FC100-100-10 (POOL_PARAMS), and WHEELS (a directory of wheels,
# e.g. .whl with ml_collections and jaxopt, installed with --no-deps into $WORK/site first). Every step runs
# under its own time limit and appends to $OUT/log.txt; figures go to $OUT/*.json (at most 8 files, as the
# lease tool returns). SMALL=1 shrinks every step for a dry run on a CPU (its own 1-epoch model, random pool
# network, the bench_attack :tiny preset).
set -u
phase=${1:?usage: device_check.sh attack|pool|tests|sweep}
OUT=${OUT:-runs/device}
PY=${PYTHON:-python3}
MNIST_DIR=${MNIST_DIR:?set MNIST_DIR to the MNIST IDX directory}
WORK=${WORK:-/tmp/device_work}
MODELS=${MODELS:-runs/models}
SMALL=${SMALL:-0}
if [ "$SMALL" = 1 ]; then POOL_PARAMS=${POOL_PARAMS:-}  # "": random initial weights
else POOL_PARAMS=${POOL_PARAMS:-runs/adv_s4b_final_seed0/adversarial/final.msgpack}; fi
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export INTRIGUING_JAX_MNIST_DIR=$MNIST_DIR
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
log=$OUT/log.txt
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl \
    >> "$log" 2>&1 \
    && export PYTHONPATH=$PYTHONPATH:$WORK/site
fi

step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, logs its output and wall time
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s.%N)
  echo "=== $name ($(date -u +%H:%M:%S) UTC, limit ${limit}s): $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt; dt=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
    "$t0" "$(date +%s.%N)")
  echo "=== $name rc=$rc wall=${dt}s" | tee -a "$log"
}

data=(--data_dir="$MNIST_DIR")
if [ "$SMALL" = 1 ]; then
  full_n=(--config.num_examples=600 --config.chunk_size=300); curve_b=64,128
  cmp=(--config=intriguing_jax/configs/bench_attack.py:tiny --config.parts="('compare','first_call')")
  cmp_dir=$WORK/bench_attack_tiny
  sizes=4,16; repeats=3; adv=(--config=intriguing_jax/configs/adversarial_training.py:smoke)
  tests=(tests/test_attack.py -k "untargeted")
  ks=0,2; bench_n=(--config.num_train=2048 --config.epochs=2); SEEDS=${SEEDS:-0,1}
else
  full_n=(); curve_b=1024,4096,16384; cmp_dir=$MODELS
  cmp=(--config.num_baseline=100 --config.parts="('convex','compare','first_call')"
       --config.first_call_rounds=1)
  sizes=4,16,64,256,1024; repeats=15; adv=(); tests=(tests/test_attack.py tests/test_adversarial_training.py)
  ks=0,16,64; bench_n=(--config.epochs=3); SEEDS=${SEEDS:-0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}
fi
read -r -a extra <<< "${EXTRA:-}"

step env 60 bash -c "nvidia-smi -L 2>/dev/null; $PY -c 'import jax, flax, optax, ml_collections, jaxopt; \
print(jax.__version__, flax.__version__, optax.__version__, ml_collections.__version__, jax.devices())'"

case $phase in
  attack)
    fc100=$MODELS/fc100-100-10
    if [ "$SMALL" = 1 ]; then  # a 1-epoch FC100-100-10 of our own (scripts/train.py names its run dir)
      step train_small 120 "$PY" scripts/train.py --config.model=fc100-100-10 --config.epochs=1 \
        --workdir="$WORK/models" "${data[@]}"
      fc100=$(ls -d "$WORK"/models/fc100-100-10_* | head -n 1)
    fi
    step full_attack 180 "$PY" scripts/bench/scale.py --config=intriguing_jax/configs/scale.py:full \
      --workdir="$WORK/scale" --config.run_dir="$fc100" "${data[@]}" "${full_n[@]}"
    cp "$WORK/scale/results.json" "$OUT/full_attack.json" 2>/dev/null
    step bench_attack 240 "$PY" scripts/bench/attack.py --workdir="$cmp_dir" "${data[@]}" "${cmp[@]}"
    cp "$cmp_dir/bench_attack.json" "$OUT/bench_attack.json" 2>/dev/null
    step curve 150 "$PY" scripts/bench/scale.py --config=intriguing_jax/configs/scale.py:gpu \
      --config.batch_sizes="$curve_b" --config.run_dir="$fc100" --workdir="$WORK/curve" "${data[@]}"
    cp "$WORK/curve/results.json" "$OUT/curve.json" 2>/dev/null
    ;;
  pool)
    step pool_generation 90 "$PY" scripts/bench/pool_generation.py --config.params="$POOL_PARAMS" \
      --config.sizes="$sizes" --config.repeats=$repeats --workdir="$OUT" "${data[@]}"
    step adversarial_training 300 "$PY" scripts/adversarial_training.py "${adv[@]}" --config.seed=0 \
      --workdir="$WORK/adv_seed0" "${data[@]}"
    cp "$WORK/adv_seed0/results.json" "$OUT/adversarial_results.json" 2>/dev/null
    ;;
  sweep)
    step bench_pool_sweep 200 "$PY" scripts/bench/pool_sweep.py --config.ks="$ks" "${bench_n[@]}" \
      --workdir="$OUT" "${data[@]}"
    step adversarial_sweep 380 "$PY" scripts/adversarial_training.py "${adv[@]}" \
      --config.sweep_seeds="($SEEDS,)" --workdir="$WORK/adv_sweep" "${data[@]}" "${extra[@]}"
    cp "$WORK/adv_sweep/results.json" "$OUT/adversarial_sweep_results.json" 2>/dev/null
    ;;
  tests)
    step tests 150 "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2;;
esac
echo "=== done $(date -u +%H:%M:%S) UTC" >> "$log"

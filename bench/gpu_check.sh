#!/usr/bin/env bash
# odkd's GPU path in one prepared run of at most 8 minutes on one GPU; with --device cpu the same steps
# at smoke sizes, in a few minutes on 2 cores, as the script's own test. Every step is timed, its
# output logged; a failed step is recorded and the next one runs.
#
#   bench/gpu_check.sh [--device cuda|cpu] [--budget SECONDS] [OUT_DIR]
#
# OUT_DIR: $OUT when set (the device tool's folder), else the argument, else /tmp/odkd-gpu-check.
# It receives summary.md (every step's rc and seconds, then the benchmark tables) and logs.tar.gz.
#
# Steps: (a) a synthetic set, two tiny seeded teachers, cache-teachers, train-student through both
# stages with AMP, evaluate and export (ONNX) of best.pth; (b) torchrun, 2 processes; (c)
# bench/train.py at demo and coco size; (d) bench/objective.py, eager and under torch.compile; (e)
# bench/cache.py --precision, the cache build rate per precision.
#
# Where zarr, dask or pycocotools are missing (the device machine), the wheels in .whl/ are installed
# into a folder of this run first (`pip download -d .whl` fills .whl/; copy it to
# the GPU machine with the checkout). odkd itself runs from this checkout as `python -m odkd`, with no install.
set -u -o pipefail
export LC_NUMERIC=C  # EPOCHREALTIME and awk with a decimal point
[ -n "${EPOCHREALTIME:-}" ] || { echo "gpu_check.sh: needs bash 5 (EPOCHREALTIME)" >&2; exit 2; }

device=cuda
budget=
out_arg=
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out_arg=$1; shift ;;
  esac
done
case $device in cpu|cuda|cuda:*) ;; *) echo "gpu_check.sh: --device must be cpu or cuda, got $device" >&2; exit 2 ;; esac
on_cpu=$([ "$device" = cpu ] && echo 1 || echo 0)
# 8 minutes on a GPU; the CPU smoke run's sizes take about 4 on 2 busy cores
budget=${budget:-$([ "$on_cpu" = 1 ] && echo 600 || echo 480)}
out=${OUT:-${out_arg:-/tmp/odkd-gpu-check}}

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 1
mkdir -p "$out" || exit 1
work=$(mktemp -d /tmp/odkd-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
logs=$work/logs
mkdir -p "$logs"
py=${PY:-}
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=$repo/.venv/bin/python || py=python3; }
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
start=$EPOCHREALTIME
deadline=$(( ${start%.*} + budget ))
steps=$work/steps.tsv
: > "$steps"

record() {  # NAME RC SECONDS NOTE; a | in the note is escaped for the summary's table
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//|/\\|}" >> "$steps"
  printf '== %s: rc %s, %s s%s\n' "$1" "$2" "$3" "${4:+ ($4)}"
}

# step NAME LIMIT CMD...: run CMD under min(LIMIT, time left), its output in logs/NAME.log
step() {
  local name=$1 limit=$2 left t0 rc secs note=
  shift 2
  left=$(( deadline - ${EPOCHREALTIME%.*} ))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped 0 "the ${budget} s budget is spent"
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "-- $name (limit ${limit} s): $*"
  t0=$EPOCHREALTIME
  # through bash, so that CMD may be one of this script's exported functions
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    note="timed out at ${limit} s"
  elif [ "$rc" != 0 ]; then
    note=$(grep -v '^\s*$' "$logs/$name.log" | tail -n 1 | cut -c1-300 | tr '\t' ' ')
  fi
  record "$name" "$rc" "$secs" "$note"
  return "$rc"
}

# a note added to the step just recorded (the last line of steps.tsv)
note() {
  local last
  last=$(tail -n 1 "$steps")
  sed -i '$d' "$steps"
  printf '%s%s%s\n' "$last" "$([ -n "${last##*$'\t'}" ] && echo '; ')" "${1//|/\\|}" >> "$steps"
  echo "   $1"
}

odkd() { "$py" -m odkd "$@"; }
export py work repo
export -f odkd

# -- setup: the wheels the device machine lacks, into this run's own folder
setup() {
  if "$py" -c "import zarr, numcodecs, dask, distributed, pycocotools" 2>/dev/null; then
    echo "zarr, numcodecs, dask, distributed and pycocotools import: nothing to install"
  else
    ls .whl/*.whl > /dev/null || { echo "no .whl/: pip download -d .whl the missing wheels (bench/RESULTS.md, GPU check)"; return 1; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$work/site" .whl/*.whl || return 1
  fi
  "$py" -c "import torch, zarr, pycocotools; print('torch', torch.__version__, 'zarr', zarr.__version__, 'CUDA devices',
            torch.cuda.device_count())" || return 1
  "$py" -c "import onnx, onnxruntime, onnxscript; print('onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)" \
    || echo "onnxscript missing: odkd export (ONNX) will say so; add onnxscript==0.7.2 onnx-ir==1.1.0 to wheels.sh's arguments"
}
export -f setup
export PYTHONPATH="$work/site:$repo${PYTHONPATH:+:$PYTHONPATH}"
step setup 120 setup

# -- sizes: the CPU smoke run's, or the GPU's
if [ "$on_cpu" = 1 ]; then
  # without bench/train.py's memory probes (a fresh process per variant): a minute or more of the smoke run
  images=(--train-images 8 --val-images 3) epochs=1 batch=4 workers=1
  train_demo=(--size demo --steps 1 --no-peak --torch-threads 1)
  train_coco=(--size coco --steps 1 --batch-size 2 --no-peak --torch-threads 1)
  objective=(--size both --rounds 3 --torch-threads 1)
  objective_compiled=(--size demo --rounds 3 --compile --torch-threads 1)
  precision=(--config pipeline/demo.toml --instances 16 --images 8 --shard 8 --batch-size 8 --repeats 1 --torch-threads 1)
  export OMP_NUM_THREADS=1
else
  images=(--train-images 32 --val-images 6) epochs=2 batch=16 workers=2
  train_demo=(--size demo --steps 20)
  train_coco=(--size coco --steps 8)
  objective=(--size both --rounds 30)
  objective_compiled=(--size coco --compile --rounds 10)
  precision=(--config pipeline/coco_hrnet.toml --instances 384 --images 160 --shard 192 --batch-size 128 --repeats 1)
fi

# -- (a) the student's whole path on the device
export world=$work/world
mkdir -p "$world"
amp_dtype_key=$(grep -q 'amp_dtype' odkd/config.py && echo yes || echo no)

# pipeline NAME AMP_DTYPE: a small student pipeline over the world; AMP on (the trainer uses it on CUDA only)
pipeline() {
  local dtype_line=
  [ "$amp_dtype_key" = yes ] && dtype_line="amp_dtype = \"$2\""
  cat > "$world/$1.toml" <<EOF
runs = "$world/runs"
device = "$device"
[data]
root = "$world/data"
input_size = [96, 128]
heatmap_size = [24, 32]
sigma = 2.0
[eval]
batch_size = 32
[teachers.primary]
model = "hrnet_tiny"
model_args = { width = 8 }
checkpoint = "$world/teacher_primary.pth"
[teachers.senior]
model = "hrnet_tiny"
model_args = { width = 8 }
seg_head = true
checkpoint = "$world/teacher_senior.pth"
[cache]
store = "$world/store.zarr"
threshold = 0.5
threshold_mode = "relative"
margin = 1.25
chunk_instances = 8
shard_instances = 32
batch_size = 32
[student]
model = "mobilenetv2_tiny"
seg_head = true
cache = "$world/store.zarr"
[student.train]
batch_size = $batch
lr = 2e-3
workers = $workers
amp = true
$dtype_line
[[student.stages]]
name = "primary"
epochs = $epochs
teacher = "primary"
[[student.stages]]
name = "senior"
epochs = $epochs
teacher = "senior"
seg_weight = 0.002
EOF
  cp "$world/$1.toml" "$logs/"
}
pipeline student bf16
pipeline ddp fp16

tiny_teachers() {  # hrnet_tiny moved off its near-zero init, so that its maps have structure (tests/conftest.py)
  "$py" - "$world" <<'EOF'
import sys
import torch
from odkd.models import build_model, save_checkpoint
torch.manual_seed(0)
for role, seg in (("primary", False), ("senior", True)):
    model = build_model("hrnet_tiny", seg_head=seg, width=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(f"{sys.argv[1]}/teacher_{role}.pth", model, model_name="hrnet_tiny", model_args={"width": 8},
                    seg_head=seg, input_size=(96, 128))
print("teachers written")
EOF
}
export -f tiny_teachers

run_summary() {  # RUN_DIR: each epoch's stage, losses, val AP and ranks_in_sync, from log.jsonl
  "$py" - "$1" <<'EOF'
import json, math, sys
from pathlib import Path
log = Path(sys.argv[1]) / "log.jsonl"
records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
finite = all(math.isfinite(v) for r in records for k, v in r.items() if k.endswith("loss") and isinstance(v, float))
for r in records:
    print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
stages = "/".join(dict.fromkeys(str(r.get("stage")) for r in records))
aps = [r["AP"] for r in records if isinstance(r.get("AP"), float)]
in_sync = [r["ranks_in_sync"] for r in records if "ranks_in_sync" in r]
print(f"epochs {len(records)}, stages {stages}, losses finite {finite}, last val AP {aps[-1] if aps else '-'}"
      + (f", ranks_in_sync {in_sync}" if in_sync else ""))
sys.exit(0 if records and finite and all(r.get("ranks_in_sync", True) for r in records) else 1)
EOF
}

step synth 60 odkd synth "$world/data" "${images[@]}" --difficulty easy --seed 0
step teachers 60 tiny_teachers
step cache-teachers 90 odkd cache-teachers --config "$world/student.toml" --device "$device"
summarize_run() {  # NAME: the run's log.jsonl kept, and its summary added to the step just recorded
  [ -f "$world/$1/log.jsonl" ] || return 0
  cp "$world/$1/log.jsonl" "$logs/$1_log.jsonl"
  note "$(run_summary "$world/$1" 2>&1 | tail -n 1)"
}

step train-student 150 odkd train-student --config "$world/student.toml" --device "$device" --out "$world/student"
summarize_run student
step evaluate 60 odkd evaluate --config "$world/student.toml" --checkpoint "$world/student/best.pth" \
  --device "$device" --stats-json "$logs/student_eval.json" && note "AP $("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['AP'])" "$logs/student_eval.json" 2>/dev/null || echo '?')"
step export 90 odkd export --config "$world/student.toml" --checkpoint "$world/student/best.pth" --out "$world/student.onnx" \
  && note "$(grep -o 'max |onnxruntime.*' "$logs/export.log" | head -n 1)"

# -- (b) torchrun, 2 processes on the one device
torchrun2() { "$py" -m torch.distributed.run --standalone --nproc_per_node 2 "$@"; }
export -f torchrun2
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
step torchrun 120 torchrun2 -m odkd train-student --config "$world/ddp.toml" --device "$device" --out "$world/ddp" \
  || { [ "$on_cpu" = 0 ] && [ "$gpus" -lt 2 ] && note "expected with $gpus GPU: odkd gives rank r cuda:r"; }
summarize_run ddp
if [ "$on_cpu" = 0 ] && [ "$gpus" -lt 2 ]; then
  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and odkd gives rank r cuda:r: so that two
  # processes can share the one GPU, both ranks take cuda:0 and talk over gloo, which carries CUDA tensors
  cat > "$work/shared_gpu_rank.py" <<'EOF'
import os
import sys

import torch.distributed as dist

os.environ["LOCAL_RANK"] = "0"
_init = dist.init_process_group
dist.init_process_group = lambda backend=None, *args, **kwargs: _init("gloo", *args, **kwargs)
from odkd.cli import main  # noqa: E402

sys.argv[0] = "odkd"
main()
EOF
  step torchrun-shared-gpu 120 torchrun2 "$work/shared_gpu_rank.py" train-student --config "$world/ddp.toml" \
    --device "$device" --out "$world/ddp_shared"
  summarize_run ddp_shared
fi

# -- (c) the student step: no KD, ODKD PT and ST stage, online KD
step bench-train-demo 120 "$py" bench/train.py --device "$device" "${train_demo[@]}"
step bench-train-coco 150 "$py" bench/train.py --device "$device" "${train_coco[@]}"

# -- (d) the objective's parts, eager and compiled
step bench-objective 60 "$py" bench/objective.py --device "$device" "${objective[@]}"
step bench-objective-compile 150 "$py" bench/objective.py --device "$device" "${objective_compiled[@]}"

# -- (e) the cache build rate per precision
step bench-cache-precision 120 "$py" bench/cache.py --precision --device "$device" "${precision[@]}"

# -- the summary
total=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
{
  echo "# odkd GPU check (bench/gpu_check.sh --device $device)"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$repo" log -1 --format='commit %h' 2>/dev/null || echo 'no git'), ${total} s of a ${budget} s budget"
  echo
  "$py" -c "import torch, platform; print(f'python {platform.python_version()}, torch {torch.__version__}, '
    + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA') + f', {__import__(\"os\").cpu_count()} CPU cores')" 2>&1
  echo
  echo "| step | rc | seconds | note |"
  echo "|---|---|---|---|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$steps"
  for name in bench-train-demo bench-train-coco bench-objective bench-objective-compile bench-cache-precision; do
    [ -f "$logs/$name.log" ] || continue
    echo
    echo "## $name"
    echo
    # the script's final block starts at its command line; cache.py has none, its tables are the tail
    if grep -q '^`' "$logs/$name.log"; then
      sed -n '/^`/,$p' "$logs/$name.log" | tail -n 80
    else
      grep -v 'Warning\|warn(' "$logs/$name.log" | tail -n 40
    fi
  done
} > "$out/summary.md"
tar -czf "$out/logs.tar.gz" -C "$work" logs
echo
cat "$out/summary.md" | sed -n '1,/^## /p' | sed '$d'
echo "written: $out/summary.md, $out/logs.tar.gz"
failed=$(awk -F'\t' '$2 != 0' "$steps" | wc -l)
[ "$failed" = 0 ]

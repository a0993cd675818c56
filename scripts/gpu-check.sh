#!/usr/bin/env bash
# One GPU lease, one script: `python -m bench.profile_step` (where a small step's time goes),
# `python -m bench.gpu`, `python -m bench.gpu_stream` (streamed shards vs in-memory tensors, ~1-2 min),
# then the four stages on the GPU with the fast settings (bf16-mixed, channels_last, torch.compile,
# GPU-resident data).
#
#   OUT=reports/gpu-check scripts/gpu-check.sh     # from the repo root, on a machine with a CUDA GPU
#   STAGES=0 scripts/gpu-check.sh                  # benchmarks only
#
# Packages the machine's Python lacks (its image has torch and lightning, not pydantic) can lie
# as wheels in .whl/; they are installed to /tmp/site first. Everything lands under $OUT.
set -uo pipefail
OUT=${OUT:-reports/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)'

python3 -m bench.profile_step --out "$OUT/profile-step.txt" 2>&1 | grep -v -i warn
python3 -m bench.gpu --out "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench-gpu.log"
# Needs webdataset (shards): if the image lacks it, its wheel and braceexpand's go in .whl/.
python3 -m bench.gpu_stream --out "$OUT/gpu-stream.json" 2>&1 | grep -v -i warn | tee "$OUT/gpu-stream.log"
[ "${STAGES:-1}" = 0 ] && exit 0

root=${GPU_RUN_ROOT:-/tmp/gpu-run}
fast=(--set "paths.root=$root" --set trainer.accelerator=gpu --set trainer.precision=bf16-mixed
      --set trainer.channels_last=true --set trainer.compile=true --set trainer.data_on_device=true
      --set trainer.deterministic=false "$@")
for stage in prepare pretrain finetune evaluate; do
  began=$SECONDS
  python3 -m pipeline "$stage" "${fast[@]}" > "$OUT/stage-$stage.log" 2>&1
  code=$?
  echo "stage $stage: exit $code in $((SECONDS - began)) s; last lines:" | tee -a "$OUT/stages.log"
  tail -n 4 "$OUT/stage-$stage.log" | tee -a "$OUT/stages.log"
  [ "$code" = 0 ] || break
done
cp -r "$root/reports" "$OUT/pipeline-reports" 2>/dev/null || true

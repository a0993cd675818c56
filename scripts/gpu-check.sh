#!/usr/bin/env bash
# One GPU lease, one call (at most ~8 minutes): the GPU figures, then the five stages on the GPU with the
# fast settings, all summarised in one JSON. Exits non-zero if any step failed or ran out of its time.
#
#   OUT=reports/gpu-check scripts/gpu-check.sh     # from the repo root, on a machine with one CUDA GPU
#   STAGES=0 scripts/gpu-check.sh                  # the benchmarks only
#   SMOKE=1 scripts/gpu-check.sh                   # on a CPU: tiny sizes, the same steps and summary (tests)
#
# Steps, each under `timeout` (seconds in brackets) so the whole call fits one lease:
#   bench.gpu (300): pretrain throughput fp32 eager vs bf16 + channels_last + compile (+ GPU-resident data);
#                    ViT-B/16 and ViT-L/16 MFU in bf16 + compile; the same ViT in fp32 eager; Lightning vs a
#                    hand-written loop
#   bench.gpu_stream (90): streamed 224 px shards vs GPU-resident tensors through the fit driver
#   the stages (120): prepare, corpus, pretrain, finetune, evaluate in bf16-mixed + compile + channels_last
# Everything lands under $OUT; $OUT/summary.json holds every figure and each step's exit code and time.
#
# Packages the machine's Python lacks can lie as wheels in .whl/; they are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-reports/gpu-check}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, record "name<TAB>exit<TAB>seconds"
  local name=$1 limit=$2 began=$SECONDS code
  shift 2
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  code=$?
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - began))" >> "$OUT/steps.tsv"
  echo "$name: exit $code in $((SECONDS - began)) s (limit $limit s)"
  [ "$code" = 0 ] || tail -n 20 "$OUT/$name.log"
  return "$code"
}

if [ "${SMOKE:-0}" = 1 ]; then
  gpu_args=(--smoke); stream_args=(--cpu --quick)
  fast=(--set trainer.accelerator=cpu --set pretrain.epochs=1 --set pretrain.glyphs_per_class=20
        --set finetune.epochs=2 --set finetune.freeze_backbone_epochs=1)
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv | tee "$OUT/nvidia-smi.csv"
  gpu_args=(); stream_args=()
  fast=(--set trainer.accelerator=gpu --set trainer.precision=bf16-mixed --set trainer.channels_last=true
        --set trainer.compile=true --set trainer.data_on_device=true --set trainer.deterministic=false)
fi
"$PYTHON" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)'

step bench-gpu 300 "$PYTHON" -m bench.gpu "${gpu_args[@]}" --out "$OUT/bench-gpu.json"
step gpu-stream 90 "$PYTHON" -m bench.gpu_stream "${stream_args[@]}" --out "$OUT/gpu-stream.json"
if [ "${STAGES:-1}" != 0 ]; then
  root=${GPU_RUN_ROOT:-$(mktemp -d /tmp/gpu-run.XXXXXX)}
  for stage in prepare corpus pretrain finetune evaluate; do
    step "stage-$stage" 120 "$PYTHON" -m pipeline "$stage" --set "paths.root=$root" "${fast[@]}" "$@" || break
  done
  cp -r "$root/reports" "$OUT/pipeline-reports" 2>/dev/null || true
fi

# One JSON: each step's exit code and time, and the figures of the files the steps wrote.
"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = [dict(zip(("step", "exit", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
steps = [{**s, "exit": int(s["exit"]), "seconds": int(s["seconds"])} for s in steps]
summary = {"ok": bool(steps) and all(s["exit"] == 0 for s in steps), "steps": steps}
for name in ("bench-gpu", "gpu-stream"):
    path = out / f"{name}.json"
    summary[name] = json.loads(path.read_text()) if path.exists() else None
metrics = out / "pipeline-reports" / "metrics.json"
summary["stages_metrics"] = json.loads(metrics.read_text()) if metrics.exists() else None
smi = out / "nvidia-smi.csv"
summary["gpu"] = smi.read_text().strip().splitlines()[-1] if smi.exists() else None
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"summary: {out / 'summary.json'} ({'all steps passed' if summary['ok'] else 'FAILED: see the steps'})")
sys.exit(0 if summary["ok"] else 1)
EOF

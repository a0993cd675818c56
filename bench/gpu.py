"""GPU benchmarks: pretrain throughput by precision/compile, ViT MFU, Lightning vs a raw PyTorch loop.

    python -m bench.gpu --out reports/bench-gpu.json   # one H100/H200: < 8 min
    python -m bench.gpu --smoke --out /tmp/smoke.json  # CPU, tiny sizes, no compile: checks the code paths

Needs only PyTorch, Lightning and this project (no dataset download: glyphs are rendered,
the ViT gets random images). Three measurements, all through `pipeline.training.fit`, the
driver every stage uses:

1. Pretrain throughput (images/s): the pretrain stage's module (params.yaml `pretrain.model`,
   glyph data, augmentation on) in fp32 eager against bf16-mixed + channels_last +
   torch.compile, and that plus GPU-resident data. Goal: >= 2x.
2. MFU of transformer-size configurations: the `vit` backbone as ViT-B/16 (width 768, depth 12)
   and ViT-L/16 (width 1024, depth 24) on 3x224x224 images, bf16-mixed + compile (block by
   block) + GPU-resident data. MFU = model FLOP/s / the card's dense bf16 peak, with model
   FLOPs counted analytically (3x the forward's matmuls and attention, as PaLM's MFU does);
   the count of torch.utils.flop_counter.FlopCounterMode is shown beside it as a check, and
   an 8192^3 bf16 matmul gives the ceiling the card really reaches. Goal: >= 40%. The same
   model in fp32 eager is timed too (goal: the fast settings >= 2x).
3. Each ViT through a hand-written PyTorch loop (same module, loader, fused AdamW, schedule,
   autocast, compile). Goal: Lightning >= 0.95x its throughput.
Throughput is timed between the end of a warm-up step (compilation done) and the last step,
with the device synchronised at both ends.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from bench.common import Stopwatch, hardware, pretrain_classifier, quiet, raw_training_steps
from pipeline.config import Config, TrainerConfig
from pipeline.params import load_config
from pipeline.data.glyphs import GLYPHS, render_glyphs
from pipeline.data.tasks import TaskArrays, to_tensor
from pipeline.models.classifier import Classifier
from pipeline.training import FitPlan, compile_in_place, fit, stream

REPO = Path(__file__).resolve().parent.parent
DIGITS_SHAPE = (1, 8, 8)  # builtin:digits, the default data source: what the pretrain stage sees

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets.
BF16_PEAK = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK if key in device_name), None)


class ThroughputProbe(Callback):
    """Seconds between the end of step `warmup` and the end of the run."""

    def __init__(self, warmup: int, clock: Stopwatch):
        self.warmup, self.clock = warmup, clock
        self.began = self.ended = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.began = self.clock.now()
        if trainer.global_step == trainer.max_steps:
            self.ended = self.clock.now()


@dataclass
class Throughput:
    name: str
    batch_size: int
    steps: int
    seconds: float
    # Peak GPU memory of the run (None on CPU): what a smaller card must hold for this batch size.
    peak_memory_gib: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.steps * self.batch_size / self.seconds

    def as_dict(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size, "timed_steps": self.steps,
                "seconds": round(self.seconds, 4), "images_per_s": round(self.images_per_s, 1),
                "peak_memory_gib": self.peak_memory_gib}


def peak_gpu_memory_gib() -> float | None:
    """Peak allocated since the last call (the counter is reset), in GiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def lightning_throughput(name: str, module: L.LightningModule, data: TaskArrays, cfg: Config, trainer: TrainerConfig,
                         batch_size: int, warmup: int, steps: int) -> Throughput:
    peak_gpu_memory_gib()  # reset: the peak reported is this run's
    stage = cfg.pretrain.model_copy(update={"batch_size": batch_size, "checkpoint_every_n_steps": warmup + steps + 1})
    probe = ThroughputProbe(warmup, Stopwatch(cuda=True))
    with tempfile.TemporaryDirectory() as checkpoints, quiet():
        fit(module, data, None, FitPlan(label=name, stage=stage, trainer=trainer, seed=cfg.seed,
                                        checkpoint_dir=checkpoints, total_steps=warmup + steps,
                                        lr=module.hparams.lr, observers=(probe,)))
    return Throughput(name, batch_size, steps, probe.ended - probe.began, peak_gpu_memory_gib())


def torch_throughput(name: str, module: Classifier, data: TaskArrays, trainer: TrainerConfig, batch_size: int,
                     warmup: int, steps: int) -> Throughput:
    """What fit() does for one device, by hand: same loader, optimizer, schedule, autocast and compile."""
    peak_gpu_memory_gib()  # reset: the peak reported is this run's
    device = torch.device("cuda" if trainer.accelerator in ("gpu", "cuda") else "cpu")
    module.to(device).train()
    if trainer.compile:
        compile_in_place(module)
    batches = stream(data, batch_size, trainer, seed=0, shuffle=True, cache_mb=1 << 20)  # what fit() uses
    clock, began = Stopwatch(cuda=True), None
    run = raw_training_steps(module, batches, device, bf16=trainer.precision == "bf16-mixed")
    for done, _ in enumerate(itertools.islice(run, warmup + steps), start=1):
        if done == warmup:
            began = clock.now()
    return Throughput(name, batch_size, steps, clock.now() - began, peak_gpu_memory_gib())


def step_flops(module: Classifier, image_shape: tuple[int, int, int], batch: int, device: torch.device) -> int:
    """FLOPs of one forward + backward at `batch` images, counted op by op (matmuls, convs, attention)."""
    images = torch.randn(batch, *image_shape, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    module.to(device).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(module(images), labels).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def vit_analytic_flops(image_shape: tuple[int, int, int], patch: int, dim: int, depth: int, classes: int) -> float:
    """Training FLOPs per image: 3x forward (backward ~2x forward); multiply-add = 2 FLOPs."""
    channels, height, width = image_shape
    tokens = (height // patch) * (width // patch)
    embed = 2 * tokens * channels * patch * patch * dim
    per_layer = 2 * tokens * 12 * dim * dim + 2 * 2 * tokens * tokens * dim  # qkv+out+mlp(4x); QK^T and AV
    return 3 * (embed + depth * per_layer + 2 * dim * classes)


def measured_matmul_flops(size: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of a large square matmul on random data: the ceiling this card really reaches."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    clock = Stopwatch(cuda=True)
    began = clock.now()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (clock.now() - began)


def glyph_data(cfg: Config, per_class: int) -> TaskArrays:
    images, labels = render_glyphs(per_class, DIGITS_SHAPE, cfg.seed)
    return TaskArrays(to_tensor(images), torch.from_numpy(labels), list(GLYPHS))


def run(smoke: bool, out: Path, peak_flops: float | None = None) -> dict:
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|num_workers|float32_matmul).*")
    on_gpu = torch.cuda.is_available() and not smoke
    if not on_gpu and not smoke:
        raise SystemExit("bench.gpu: no CUDA device visible; use --smoke for a CPU check of the code paths")
    cfg = load_config(REPO / "params.yaml")
    base = cfg.trainer.model_copy(update={"accelerator": "gpu" if on_gpu else "cpu", "devices": 1, "num_nodes": 1,
                                          "strategy": "auto", "deterministic": False, "num_workers": 0})
    vit_b16 = dict(name="ViT-B/16", width=768, depth=12, heads=12, patch_size=16)
    vit_l16 = dict(name="ViT-L/16", width=1024, depth=24, heads=16, patch_size=16)
    sizes = dict(glyphs_per_class=20, batches=[16], steps=3,
                 vits=[dict(name="tiny", width=32, depth=2, heads=2, patch_size=8)], vit_shape=(3, 32, 32),
                 vit_batch=4, vit_warmup=1, vit_steps=2) if smoke else \
        dict(glyphs_per_class=cfg.pretrain.glyphs_per_class, batches=[cfg.pretrain.batch_size, 1024], steps=300,
             vits=[vit_b16, vit_l16], vit_shape=(3, 224, 224), vit_batch=256, vit_warmup=10, vit_steps=50)
    report: dict = {"hardware": hardware(), "smoke": smoke, "pretrain": [], "vit": [], "errors": {}}
    started = time.perf_counter()
    print(f"bench.gpu on {report['hardware'].get('gpu', 'CPU (smoke)')}, torch {torch.__version__}, "
          f"lightning {L.__version__}", flush=True)

    def save() -> None:
        report["total_s"] = round(time.perf_counter() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    # Each section saves what it measured, and one that fails is recorded, not fatal:
    # a GPU lease is short, and a later section's numbers are worth having on their own.
    sections = [("pretrain", lambda: pretrain_section(cfg, base, sizes, on_gpu, report))]
    sections += [(vit["name"], lambda vit=vit: vit_section(cfg, base, sizes, vit, on_gpu, peak_flops, report))
                 for vit in sizes["vits"]]
    for name, section in sections:
        try:
            section()
        except Exception as error:  # noqa: BLE001 - reported in the JSON and on stdout
            report["errors"][name] = f"{type(error).__name__}: {error}"
            print(f"\n{name} FAILED: {report['errors'][name]}", flush=True)
            traceback.print_exc()
        save()
        print(f"[{time.perf_counter() - started:.0f} s]", flush=True)
    print(f"\nbench.gpu done in {report['total_s']:.0f} s; numbers in {out}")
    if report["errors"]:
        raise SystemExit(f"bench.gpu: sections failed: {', '.join(report['errors'])}")
    return report


def pretrain_section(cfg: Config, base: TrainerConfig, sizes: dict, on_gpu: bool, report: dict) -> None:
    """1. The pretrain stage's module and data: fp32 eager against bf16 + channels_last + compile."""
    glyphs = glyph_data(cfg, sizes["glyphs_per_class"])
    fast = "bf16 + channels_last" + (" + compile" if on_gpu else " (compile off: smoke)")
    variants = [
        ("fp32 eager", dict(precision="32-true")),
        (fast, dict(precision="bf16-mixed", channels_last=True, compile=on_gpu)),
        ("  + data on device", dict(precision="bf16-mixed", channels_last=True, compile=on_gpu, data_on_device=True)),
    ]
    for batch in sizes["batches"]:
        # Warm up past two epochs: the last, smaller batch of an epoch triggers a recompile
        # (with a dynamic batch dimension), which must not land inside the timed steps.
        warmup = 2 * math.ceil(len(glyphs.labels) / batch) + 2
        rows = []
        for name, update in variants:
            trainer = base.model_copy(update=update)
            stage_cfg = cfg.model_copy(update={"trainer": trainer})
            module = pretrain_classifier(stage_cfg, DIGITS_SHAPE, len(GLYPHS), warmup + sizes["steps"])
            rows.append(lightning_throughput(f"pretrain {name}", module, glyphs, stage_cfg, trainer, batch,
                                             warmup, sizes["steps"]))
        speedup = rows[1].images_per_s / rows[0].images_per_s
        report["pretrain"].append({"batch_size": batch, "rows": [r.as_dict() for r in rows],
                                   "speedup": round(speedup, 3),
                                   "speedup_data_on_device": round(rows[2].images_per_s / rows[0].images_per_s, 3)})
        print(f"\npretrain stage module ({cfg.pretrain.model.arch}, width {cfg.pretrain.model.width}), batch {batch}:")
        for r in rows:
            print(f"  {r.name:<42} {r.images_per_s:12,.0f} images/s")
        print(f"  SPEEDUP {fast} / fp32 eager: {speedup:.2f}x (goal >= 2x)", flush=True)


def vit_section(cfg: Config, base: TrainerConfig, sizes: dict, vit: dict, on_gpu: bool, peak_flops: float | None,
                report: dict) -> None:
    """2 + 3. A transformer's MFU, and Lightning against a raw PyTorch loop of the same module."""
    device = torch.device("cuda" if on_gpu else "cpu")
    v = {key: value for key, value in vit.items() if key != "name"}
    vit_cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={
        "model": cfg.pretrain.model.model_copy(update={"arch": "vit", "dropout": 0.0, **v})})})
    shape, batch = sizes["vit_shape"], sizes["vit_batch"]
    classes = 1000 if on_gpu else 10
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    count = batch * 8
    vit_data = TaskArrays(torch.randn(count, *shape, device=device, generator=generator),
                          torch.randint(0, classes, (count,), device=device, generator=generator), [str(i) for i in range(classes)])
    trainer = base.model_copy(update={"precision": "bf16-mixed", "compile": on_gpu, "data_on_device": True})
    warm, timed = sizes["vit_warmup"], sizes["vit_steps"]

    def vit_module() -> Classifier:
        stage_cfg = vit_cfg.model_copy(update={"trainer": trainer})
        # Random images: nothing to augment, and the MFU is the model's.
        return pretrain_classifier(stage_cfg, shape, classes, warm + timed, augment=False)

    counted = step_flops(vit_module(), shape, min(batch, 8), device) / min(batch, 8)
    analytic = vit_analytic_flops(shape, v["patch_size"], v["width"], v["depth"], classes)
    peak = peak_flops or (bf16_peak(torch.cuda.get_device_name()) if on_gpu else None)
    measured = measured_matmul_flops() if on_gpu else None
    result: dict = {
        "name": vit["name"],
        "config": {**v, "image_shape": list(shape), "batch_size": batch, "classes": classes,
                   "precision": trainer.precision, "compile": trainer.compile},
        "train_flops_per_image_analytic": analytic, "train_flops_per_image_counted": counted,
        "bf16_peak_flops": peak, "bf16_matmul_flops_measured": measured,
    }
    report["vit"].append(result)
    lit = lightning_throughput(f"{vit['name']} lightning", vit_module(), vit_data, vit_cfg, trainer, batch, warm, timed)
    result["lightning"] = lit.as_dict()
    raw = torch_throughput(f"{vit['name']} pytorch", vit_module(), vit_data, trainer, batch, warm, timed)
    mfu = {r.name: (r.images_per_s * analytic / peak if peak else None) for r in (lit, raw)}
    result.update({
        "pytorch": raw.as_dict(), "mfu_lightning": mfu[lit.name], "mfu_pytorch": mfu[raw.name],
        "mfu_lightning_of_measured_matmul": lit.images_per_s * analytic / measured if measured else None,
        "lightning_over_pytorch": round(lit.images_per_s / raw.images_per_s, 4),
    })
    print(f"\n{vit['name']}: width {v['width']} depth {v['depth']} heads {v['heads']} patch {v['patch_size']} on "
          f"{'x'.join(map(str, shape))}, batch {batch}, bf16-mixed{' + compile' if trainer.compile else ''}:")
    print(f"  train GFLOPs/image: {analytic / 1e9:.2f} analytic (used), {counted / 1e9:.2f} FlopCounterMode; "
          f"bf16 peak {'unknown' if not peak else f'{peak / 1e12:.0f} TFLOP/s'} (datasheet)"
          + (f", {measured / 1e12:.0f} TFLOP/s measured on an 8192^3 matmul" if measured else ""))
    for r in (lit, raw):
        shown = "n/a" if mfu[r.name] is None else f"{mfu[r.name]:.1%}"
        print(f"  {r.name:<22} {r.images_per_s:10,.1f} images/s  {r.images_per_s * analytic / 1e12:8.1f} TFLOP/s  MFU {shown}")
    print(f"  MFU (Lightning): {'n/a' if mfu[lit.name] is None else f'{mfu[lit.name]:.1%}'} (goal >= 40%)")
    print(f"  RATIO Lightning / PyTorch throughput: {result['lightning_over_pytorch']:.3f} (goal >= 0.95)", flush=True)

    # The same model in fp32 eager, a few steps at a quarter of the batch (fp32 activations of
    # ViT-L at 256 would not fit an 80 GB card): what the fast settings buy once a model loads the GPU.
    eager = trainer.model_copy(update={"precision": "32-true", "compile": False})
    eager_batch, eager_steps = max(batch // 4, 1), max(timed // 5, 2)
    slow = lightning_throughput(f"{vit['name']} fp32 eager", pretrain_classifier(
        vit_cfg.model_copy(update={"trainer": eager}), shape, classes, 2 + eager_steps, augment=False),
        vit_data, vit_cfg, eager, eager_batch, 2, eager_steps)
    result.update({"fp32_eager": slow.as_dict(), "speedup_over_fp32_eager": round(lit.images_per_s / slow.images_per_s, 3)})
    print(f"  {slow.name:<22} {slow.images_per_s:10,.1f} images/s (batch {eager_batch})")
    print(f"  SPEEDUP bf16 + compile / fp32 eager: {result['speedup_over_fp32_eager']:.2f}x (goal >= 2x)", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"), help="JSON results path")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, no compile: exercise the code paths")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak of an unlisted card, in TFLOP/s")
    args = parser.parse_args(argv)
    return run(args.smoke, args.out, args.peak_tflops * 1e12 if args.peak_tflops else None)


if __name__ == "__main__":
    main()

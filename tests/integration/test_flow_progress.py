"""Live progress and the run graph in the Prefect UI (flows/progress.py, flows/training.py).

The parser reads the text pipeline/training/callbacks.py's ProgressLines really prints (locally, and from a pod
with the launcher's `[rank N] ` prefix). One flow run on the TINY config then shows a progress artifact
per training stage ending at 100, stage task runs whose inputs record their dvc.yaml upstreams (what
the UI's graph draws), and a second run whose stages, restored from DVC's run-cache, end "Restored".
"""
from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest

pytest.register_assert_rewrite("tests.prefect_fixtures")
from tests.prefect_fixtures import STAGES, TINY, artifacts_of, task_runs_of  # noqa: E402

pytest_plugins = ["tests.prefect_fixtures"]


def _progress_lines(label: str, total: int, every: int = 2, start_step: int = 0, val_acc: float = 0.912) -> list[str]:
    """What ProgressLines prints for a fit of `total` steps (a stand-in trainer drives its hooks)."""
    from pipeline.training.callbacks import ProgressLines

    callback = ProgressLines(label, total, every, start_step)
    optimizer = SimpleNamespace(param_groups=[{"lr": 2.1e-3}])
    trainer = SimpleNamespace(world_size=2, global_rank=0, node_rank=0, is_global_zero=True, global_step=0,
                              current_epoch=0, optimizers=[optimizer], sanity_checking=False,
                              callback_metrics={"val/acc": val_acc})
    module = SimpleNamespace(train_means=SimpleNamespace(last_loss=0.4123))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        callback.on_fit_start(trainer, module)
        for step in range(start_step + 1, total + 1):
            trainer.global_step = step
            trainer.current_epoch = step * 2 // (total + 1)
            callback.on_train_batch_end(trainer, module, None, None, step)
        callback.on_validation_end(trainer, module)
    return out.getvalue().splitlines()


def test_parser_reads_progress_lines_text():
    from flows.progress import parse

    lines = _progress_lines("pretrain", 10)
    assert lines[0] == "[pretrain] world_size=2 global_rank=0 node_rank=0 start_step=0 total_steps=10"
    start, *steps, val = [parse(line) for line in lines]
    assert (start.kind, start.label, start.total, start.start_step) == ("start", "pretrain", 10, 0)
    assert [s.step for s in steps] == [2, 4, 6, 8, 10] and all(s.total == 10 for s in steps)
    assert steps[-1].loss == pytest.approx(0.4123) and steps[-1].steps_per_s > 0 and steps[-1].epoch == 1
    assert (val.kind, val.val_acc) == ("val", pytest.approx(0.912))

    variant = parse(_progress_lines("finetune:scratch", 4)[1])
    assert (variant.label, variant.stage, variant.step) == ("finetune:scratch", "finetune", 2)
    # From a pod: the launcher prefixes the rank; only rank 0's lines count.
    assert parse("[rank 0] " + lines[3]).step == 6
    assert parse("[rank 1] " + lines[3]) is None
    assert parse("[rank 1] [pretrain] world_size=2 global_rank=1 node_rank=1 start_step=0 total_steps=10") is None
    for other in ("[finetune] 3 classes: 15 labelled training images (labels_per_class=5)",
                  "[pretrain] resuming from /x/last.ckpt at step 4", "Epoch 0: 100%", ""):
        assert parse(other) is None


def test_progress_covers_both_finetune_variants_and_throttles():
    from flows.progress import StageProgress

    clock = iter(range(0, 10_000)).__next__  # one "second" per line
    passed = []
    progress = StageProgress("finetune", passed.append, parts=["finetune:finetuned", "finetune:scratch"],
                             interval_s=5, publish=False, clock=clock)
    finetuned, scratch = _progress_lines("finetune:finetuned", 20, every=1), _progress_lines("finetune:scratch", 20, every=1)
    for line in ["[finetune] 3 classes: 15 labelled training images", *finetuned]:
        progress.log(line)
    assert progress.percent() == 50.0
    for line in scratch[:11]:  # start line + 10 steps
        progress.log(line)
    assert progress.percent() == 75.0
    assert "part 2 of 2" in progress.markdown() and "ETA" in progress.markdown()
    assert progress.eta_s() > 0
    for line in scratch[11:]:
        progress.log(line)
    assert passed == ["[finetune] 3 classes: 15 labelled training images", *finetuned, *scratch]  # unchanged
    # Throttled (one update per 5 lines here), the last step always published, and the bar never goes back.
    assert progress.published[-1] == 100.0
    assert len(progress.published) < len(finetuned + scratch) / 3
    assert progress.published == sorted(progress.published)
    assert "last val/acc (finetune:scratch) | 0.9120" in progress.markdown()


def test_eta_counts_only_the_steps_since_a_resume():
    from flows.progress import StageProgress

    progress = StageProgress("pretrain", lambda line: None, publish=False)
    progress.log("[pretrain] world_size=1 global_rank=0 node_rank=0 start_step=50 total_steps=100")
    # ProgressLines' rate is step / seconds since this process started: 60 steps/s at step 60 is 10 steps in 1 s.
    progress.log("[pretrain] step 60/100 epoch 0 loss 0.5000 lr 1.00e-03 (60.0 steps/s)")
    assert progress.eta_s() == pytest.approx(4.0)
    assert progress.percent() == 60.0


def test_curves_markdown_thins_each_series_keeping_first_and_last():
    from flows.summary import curves_markdown

    text = curves_markdown({"pretrain/train_loss": [[i, 1.0 / (i + 1)] for i in range(100)],
                            "scratch/val_acc": [[10, 0.5]], "empty": []}, points_per_series=4)
    assert "**pretrain/train_loss**" in text and "| 0 | 1.0000 |" in text and "| 99 | 0.0100 |" in text
    assert text.count("\n| 33 |") == 1 and "| 10 | 0.5000 |" in text and "empty" not in text
    assert text.count("|---:|---:|") == 2


@pytest.mark.slow
def test_flow_run_publishes_progress_records_the_stage_chain_and_restored_states(flow_env):
    from flows.parameters import TrainingParameters
    from flows.training import train

    state = train(TrainingParameters(extra_overrides=TINY), return_state=True)
    assert state.is_completed(), state
    assert state.result()["stages"] == {stage: "ran" for stage in STAGES}
    run_id = state.state_details.flow_run_id
    runs = {run.name.split(":", 1)[1]: run for run in task_runs_of(run_id) if run.name.startswith("run_stage:")}
    assert set(runs) == set(STAGES)
    assert all(run.state.name == "Completed" for run in runs.values())

    # The run graph: each stage task run's inputs name its upstream stages' task runs (from dvc.yaml's deps).
    def upstream(stage):
        return {str(ref.id) for refs in runs[stage].task_inputs.values() for ref in refs
                if getattr(ref, "input_type", None) == "task_run"}
    ids = {stage: str(run.id) for stage, run in runs.items()}
    assert upstream("prepare") == set() and upstream("corpus") == set()
    assert upstream("pretrain") == {ids["corpus"]}
    assert upstream("finetune") == {ids["prepare"], ids["pretrain"]}
    assert upstream("evaluate") == {ids["prepare"], ids["pretrain"], ids["finetune"]}

    # Live progress: one bar per training stage, on that stage's task run, finished at 100.
    artifacts = artifacts_of(run_id)
    for stage in ("pretrain", "finetune"):
        bar, detail = artifacts[f"progress-{stage}"], artifacts[f"progress-{stage}-detail"]
        assert bar.type == "progress" and float(bar.data) == 100.0, (stage, bar.data)
        assert bar.task_run_id == runs[stage].id and detail.task_run_id == runs[stage].id
        assert detail.type == "markdown" and "**100.0%**" in detail.data and "| loss |" in detail.data
        assert "val/acc" in detail.data
    assert "part 2 of 2" in artifacts["progress-finetune-detail"].data
    assert not {f"progress-{stage}" for stage in ("prepare", "corpus", "evaluate")} & set(artifacts)
    (workspace,) = flow_env.run_dirs()
    if (workspace / "models" / "release" / "curves.json").exists():  # evaluate writes it (pipeline/curves.py)
        assert artifacts["curves"].type == "markdown" and "| step | value |" in artifacts["curves"].data

    # Second run, same inputs: DVC's run-cache restores every stage; the UI shows them "Restored".
    again = train(TrainingParameters(extra_overrides=TINY), return_state=True)
    assert again.is_completed(), again
    assert again.result()["stages"] == {stage: "run-cache" for stage in STAGES}
    restored = [run for run in task_runs_of(again.state_details.flow_run_id) if run.name.startswith("run_stage:")]
    assert len(restored) == len(STAGES)
    assert {run.state.name for run in restored} == {"Restored"}
    assert all(run.state.is_completed() and "run-cache" in run.state.message for run in restored)
    assert not any(key.startswith("progress-") for key in artifacts_of(again.state_details.flow_run_id))

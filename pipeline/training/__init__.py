"""Training: the fit driver every stage uses (driver), what runs beside the model (callbacks), and the
training curves written during fit (curve_logging).

    plan = plan_fit(cfg, cfg.pretrain, train.samples, "pretrain", checkpoint_dir)
    result = fit(module, train, val, plan)
"""
from pipeline.curves import CURVES_DIR
from pipeline.training.driver import (
    FitPlan, FitResult, TrainData, checkpoint_dir_for, compile_in_place, fit, plan_fit, publish_curves, stream,
)

__all__ = ["CURVES_DIR", "FitPlan", "FitResult", "TrainData", "checkpoint_dir_for", "compile_in_place", "fit",
           "plan_fit", "publish_curves", "stream"]

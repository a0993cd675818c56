"""Deep-learning training pipeline: prepare -> pretrain -> finetune -> evaluate."""

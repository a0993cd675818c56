"""Backbones, the Lightning classifier and contrastive pretrainer, augmentation, model bundles."""

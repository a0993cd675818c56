"""The names of the model files, without torch: flows name the released model too (flows/promotion.py)."""
SUFFIX = ".safetensors"
CLASSIFIER_FILE = "finetuned" + SUFFIX  # the released model, in models/finetune, models/release and the registry
SCRATCH_FILE = "scratch" + SUFFIX
BACKBONE_FILE = "backbone" + SUFFIX

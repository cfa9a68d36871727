"""Values every layer shares, defined once on the ground floor (imports nothing of crfm), so that the command-line
flags (`crfm.utils.flags`), plots (`crfm.utils.viz`) and the data layer need not import the layers that give them
meaning (`crfm.data.index` for labels, `crfm.models.conditioning` for mask encodings)."""

from __future__ import annotations

# The label id that is no class: never trained on, never scored, drawn black.
IGNORE_INDEX = 255

# How a label mask reaches the mask branch (what each means: crfm.models.conditioning).
MASK_ENCODINGS = ("grey", "palette", "onehot")
# train.py's --mask_encoding default, chosen on the demo's validation split (bench/results_fidelity.md).
DEFAULT_MASK_ENCODING = "onehot"
# Checkpoints written before the encoding was recorded used the paper's grey rendering.
LEGACY_MASK_ENCODING = "grey"

# What train.py trains (crfm.models.trained_weights) and how the mask branch starts (crfm.models.mmdit); here so
# that train.py's flags offer them without loading diffusers' model code.
TRAIN_MODES = ("full", "lora")
MASK_INITS = ("copy", "fresh")
# Dihedral views a segmentor's probabilities can be averaged over (the FreeMask filter's --views).
VIEW_COUNTS = (1, 2, 4, 8)

# Files that hold a diffusers component's weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin")

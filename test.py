"""Synthesize image-mask pairs with the trained MM-DiT; CRFM turns on with --mmseg_config/--mmseg_ckpt.

    python test.py --pretrained_model_name_or_path sd3.5_medium --data_root demo --json_file index_.jsonl \
        --lora_ckpt work_dirs/demo/final --vectors_path vectors/demo --num_cls 6 --work_dir work_dirs/synth
See `crfm.sampling.synthesis` (and crfm_test.sh for the paper's CRFM setting).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from crfm.sampling.synthesis import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

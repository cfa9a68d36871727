"""Fine-tune SD3/SD3.5's MM-DiT with a mask branch (stage (a) of the paper); see `crfm.training`.

    accelerate launch --config_file configs/accelerate_single_gpu.yaml train.py \
        --pretrained_model_name_or_path sd3.5_medium --data_root demo --train_file index_.jsonl \
        --vectors_path vectors/demo --work_dir work_dirs/demo --num_cls 6
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from crfm.training.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

"""Train an mmseg segmentor on real (+ synthesized) data with mmseg's Runner; see `crfm.segmentation.downstream`.

    python scripts/train_segmentor.py --data_root REAL --json_file train.jsonl --val_file val.jsonl \
        --work_dir DIR [--synth_root SYNTH --synth_ratio 0.5] [--max_iters 1500] [--num_cls 6]

The same as `python -m crfm.segmentation.downstream` and `crfm-train-segmentor` (installed package).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from crfm.segmentation.downstream import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

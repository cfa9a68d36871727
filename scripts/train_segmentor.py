"""Train an mmseg segmentor on real (+ synthesized) data with mmseg's Runner; see `crfm/downstream.py`.

    python scripts/train_segmentor.py --data_root REAL --train_file train.jsonl --val_file val.jsonl \
        --work_dir DIR [--synth_root SYNTH --synth_ratio 0.5] [--max_iters 1500] [--num_cls 6]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from a checkout

from crfm.downstream import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

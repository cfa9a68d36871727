"""Encode every prompt of a dataset index once with SD3's three text encoders; see `crfm.data.vectorize`.

    python preprocess/vectorize.py --pretrained_model_name_or_path sd3.5_medium \
        --data_root demo --src_json_file index.jsonl --out_json_file index_.jsonl --work_dir vectors/demo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from crfm.data.vectorize import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

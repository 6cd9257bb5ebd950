"""Train the demo text-to-image model with planted memorization: the images it memorizes are known.

    nice -n 10 python jobs/train_demo_model.py --out memray/demo_assets
    python jobs/train_demo_model.py --smoke --out /tmp/demo-smoke          # about a minute on CPU
    python jobs/train_demo_model.py --check-only --out memray/demo_assets  # measure the ground truth again

The training, its data plan and its ground truth: memray.evaluation.demo_training (docs/demo-model.md).
"""

import json
import os

import torch

from memray.evaluation.demo_training import main

if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(json.dumps(main().get("truth"), indent=1))

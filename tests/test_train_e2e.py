"""End to end: train_net.py trains the toy SGR model, and it segments far above chance."""
import os
import subprocess
import sys

import pytest
from conftest import REPO, TOY_SGR

from detectron2.modeling import build_model

from sgr_d2.engine import AtomicCheckpointer, Trainer
from sgr_d2.config import load_config


@pytest.mark.slow
def test_toy_sgr_trains_evaluates_and_beats_the_majority_class(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from demo_toy import majority_class_miou

    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", TOY_SGR,
           "SOLVER.MAX_ITER", "150", "SOLVER.CHECKPOINT_PERIOD", "1000", "OUTPUT_DIR", str(out),
           "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900, capture_output=True)
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

    cfg = load_config(TOY_SGR, ["MODEL.DEVICE", "cpu", "TEST.AUG.SCALES", "[0.75, 1.0, 1.25]",
                                "OUTPUT_DIR", str(out)])
    model = build_model(cfg)
    AtomicCheckpointer(model).load(str(out / "model_final.pth"))
    model.eval()
    single = Trainer.test(cfg, model)["sem_seg"]
    multi = Trainer.test_with_TTA(cfg, model)["sem_seg_TTA"]
    chance = majority_class_miou("sgr_toy_sem_seg_train", "sgr_toy_sem_seg_val", 6)
    assert single["mIoU"] > 2 * chance, (single["mIoU"], chance)
    assert multi["mIoU"] > 2 * chance, (multi["mIoU"], chance)
    assert 0 <= single["pACC"] <= 100 and "IoU-ball" in single

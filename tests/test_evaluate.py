"""scripts/evaluate.py and seg.evaluation: official numbers, file matching, clear errors."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, load_script
from seg.data.labels import CLASS_NAMES
from seg.errors import DataError
from seg.evaluation import evaluate_prediction_dir

evaluate_script = load_script("evaluate")

# labelIds: 0 unlabeled, 4 static (void), 7 road, 8 sidewalk, 9 parking (ignored class), 26 car
TINY_GT = {
    "aachen_000000_000019": [[7, 7, 7, 8], [8, 26, 0, 4]],
    "bochum_000001_000002": [[7, 9, 26, 26], [26, 26, 8, 0]],
}


def write_png(path: Path, array: np.ndarray | list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def write_gt(root: Path, images: dict[str, list], split: str = "val") -> Path:
    for stem, array in images.items():
        write_png(root / "gtFine" / split / stem.split("_")[0] / f"{stem}_gtFine_labelIds.png", array)
    return root


def write_predictions(pred_dir: Path, images: dict[str, np.ndarray | list]) -> Path:
    for stem, array in images.items():
        write_png(pred_dir / stem.split("_")[0] / f"{stem}_leftImg8bit.png", array)
    return pred_dir


def official_evaluation(gt_files: list[Path], pred_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """cityscapesScripts' evalPixelLevelSemanticLabeling on these files, its own matching included."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    def fail(message: str) -> None:
        raise AssertionError(f"official evaluation: {message}")

    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # removed in numpy 2.4
    monkeypatch.setattr(official, "printError", fail)  # instead of sys.exit
    args = copy.copy(official.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    args.predictionPath = str(pred_dir)
    args.predictionWalk = None
    predictions = [official.getPrediction(args, str(gt)) for gt in gt_files]
    return official.evaluateImgLists(predictions, [str(gt) for gt in gt_files], args)


def assert_same_as_official(ours: dict, official: dict) -> None:
    assert set(ours["iou"]) == set(CLASS_NAMES)
    for name in CLASS_NAMES:
        assert ours["iou"][name] == pytest.approx(official["classScores"][name], abs=1e-6, nan_ok=True), name
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-6)


def written_as_floats(metrics: dict) -> dict:
    """metrics.json read back: null (NaN) -> nan."""
    return {**metrics, "iou": {k: math.nan if v is None else v for k, v in metrics["iou"].items()}}


def test_matches_official_evaluation_on_synthetic_val(synthetic_root: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gt_files = sorted((synthetic_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert gt_files
    generator = np.random.default_rng(0)
    predictions = {}
    for gt_file in gt_files:
        gt = np.asarray(Image.open(gt_file))
        noise = generator.integers(0, 34, gt.shape)  # any labelId, ignored ones included
        predictions[gt_file.name[: -len("_gtFine_labelIds.png")]] = np.where(generator.random(gt.shape) < 0.6, gt, noise)
    pred_dir = write_predictions(tmp_path / "pred", predictions)

    official = official_evaluation(gt_files, pred_dir, monkeypatch)
    ours = evaluate_prediction_dir(pred_dir, synthetic_root, "val")
    assert_same_as_official(ours, official)
    assert ours["num_images"] == len(gt_files)
    assert 0 < ours["miou"] < 1


def test_matches_official_evaluation_with_absent_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    # road right and wrong, car predicted as parking (ignored id: a miss), sidewalk as car,
    # building (11) predicted on void GT (no FP), bicycle (33) predicted on road (an FP)
    pred_dir = write_predictions(tmp_path / "pred", {
        "aachen_000000_000019": [[7, 33, 7, 26], [8, 9, 11, 11]],
        "bochum_000001_000002": [[7, 7, 26, 0], [26, 26, 8, 11]],
    })
    gt_files = sorted((root / "gtFine" / "val").glob("*/*.png"))
    official = official_evaluation(gt_files, pred_dir, monkeypatch)
    ours = evaluate_prediction_dir(pred_dir, root, "val")
    assert_same_as_official(ours, official)
    # by hand: road TP 3 FN 1 FP 0 (the parking GT pixel is void); sidewalk TP 2 FN 1;
    # car TP 3 FN 2 FP 1; bicycle TP 0 FP 1; every other class NaN
    assert ours["iou"]["road"] == pytest.approx(3 / 4)
    assert ours["iou"]["sidewalk"] == pytest.approx(2 / 3)
    assert ours["iou"]["car"] == pytest.approx(3 / 6)
    assert ours["iou"]["bicycle"] == 0.0
    assert math.isnan(ours["iou"]["building"]) and math.isnan(ours["iou"]["person"])
    assert ours["miou"] == pytest.approx((3 / 4 + 2 / 3 + 3 / 6 + 0) / 4)
    assert ours["pixel_accuracy"] == pytest.approx(8 / 12)


def test_undefined_and_255_predictions_are_misses(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", {"aachen_000000_000019": [[7, 7, 7, 7]]})
    pred_dir = write_predictions(tmp_path / "pred", {"aachen_000000_000019": [[7, 255, 40, 7]]})
    metrics = evaluate_prediction_dir(pred_dir, root)
    assert metrics["iou"]["road"] == pytest.approx(0.5)
    assert metrics["undefined_prediction_pixels"] == 2


def test_cli_writes_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", TINY_GT)  # perfect predictions
    assert evaluate_script.main(["--data-root", str(root), "--predictions", str(pred_dir)]) == 0
    written = json.loads((pred_dir / "metrics.json").read_text())
    assert written["miou"] == 1.0 and written["pixel_accuracy"] == 1.0
    assert written["iou"]["road"] == 1.0 and written["iou"]["person"] is None  # NaN -> null
    assert list(written["iou"]) == list(CLASS_NAMES)
    assert "mIoU" in capsys.readouterr().out
    out = tmp_path / "elsewhere"
    assert evaluate_script.main(["--data-root", str(root), "--predictions", str(pred_dir), "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 2


def test_script_runs_as_a_program(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", TINY_GT)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--data-root", str(root),
                           "--predictions", str(pred_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (pred_dir / "metrics.json").is_file()
    assert "mIoU" in done.stdout


def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    assert evaluate_script.main(["--data-root", str(root), "--predictions", str(tmp_path / "nope")]) == 2
    assert "error: prediction directory" in capsys.readouterr().err
    assert evaluate_script.main(["--checkpoint", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "absent.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_script.main(["--checkpoint", str(tmp_path / "absent.pt")])  # --out is required


def test_prediction_names_follow_the_official_pattern(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = tmp_path / "pred"
    # any name starting with the stem, anywhere under the directory; other files ignored
    write_png(pred_dir / "a" / "b" / "aachen_000000_000019_pred.png", TINY_GT["aachen_000000_000019"])
    write_png(pred_dir / "bochum_000001_000002.png", TINY_GT["bochum_000001_000002"])
    write_png(pred_dir / "zurich_000000_000001_leftImg8bit.png", [[0]])
    (pred_dir / "aachen_000000_000019_notes.txt").write_text("not a png")
    assert evaluate_prediction_dir(pred_dir, root)["miou"] == 1.0


def test_missing_prediction_names_the_image(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", {"aachen_000000_000019": TINY_GT["aachen_000000_000019"]})
    with pytest.raises(DataError, match="no prediction for 1 of 2 .*bochum_000001_000002"):
        evaluate_prediction_dir(pred_dir, root)


def test_duplicate_predictions_are_refused(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", TINY_GT)
    write_png(pred_dir / "color" / "aachen_000000_000019_color.png", TINY_GT["aachen_000000_000019"])
    with pytest.raises(DataError, match="several predictions match ground truth aachen_000000_000019"):
        evaluate_prediction_dir(pred_dir, root)


def test_wrong_size_and_colour_predictions_are_refused(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", {**TINY_GT, "bochum_000001_000002": [[7, 7, 7]]})
    with pytest.raises(DataError, match="bochum_000001_000002.*size 3x1 .*differs"):
        evaluate_prediction_dir(pred_dir, root)
    colour = np.zeros((2, 4, 3), dtype=np.uint8)
    write_png(pred_dir / "bochum" / "bochum_000001_000002_leftImg8bit.png", colour)
    with pytest.raises(DataError, match="3 channels"):
        evaluate_prediction_dir(pred_dir, root)
    (pred_dir / "bochum" / "bochum_000001_000002_leftImg8bit.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match="cannot read prediction"):
        evaluate_prediction_dir(pred_dir, root)


def test_bad_directories_are_clear_errors(tmp_path: Path) -> None:
    root = write_gt(tmp_path / "data", TINY_GT)
    pred_dir = write_predictions(tmp_path / "pred", TINY_GT)
    with pytest.raises(DataError, match="prediction directory"):
        evaluate_prediction_dir(tmp_path / "absent", root)
    with pytest.raises(DataError, match="no split 'test'.*Splits found: val"):
        evaluate_prediction_dir(pred_dir, root, "test")
    with pytest.raises(DataError):
        evaluate_prediction_dir(pred_dir, tmp_path / "no_data")
    write_gt(tmp_path / "bad", {"aachen_000000_000019": [[7, 200]]})
    write_predictions(tmp_path / "pred2", {"aachen_000000_000019": [[7, 7]]})
    with pytest.raises(DataError, match=r"unknown label ids \[200\]"):
        evaluate_prediction_dir(tmp_path / "pred2", tmp_path / "bad")


def test_checkpoint_mode_predicts_writes_and_evaluates(tiny_config, synthetic_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("seg.models")
    from seg.checkpoint import save_checkpoint
    from seg.data.cityscapes import build_dataloaders
    from seg.engine import evaluate
    from seg.models import build_model_from_config

    torch.manual_seed(0)
    model = build_model_from_config(tiny_config.model)
    checkpoint = save_checkpoint(tmp_path / "best.pt", {
        "model": model.state_dict(), "optimizer": None, "scheduler": None, "scaler": None, "epoch": 1,
        "config": tiny_config.to_dict(), "metrics": {}, "best_miou": 0.0, "version": 1})
    out = tmp_path / "eval"
    assert evaluate_script.main(["--checkpoint", str(checkpoint), "--data-root", str(synthetic_root),
                                 "--out", str(out), "--device", "cpu"]) == 0

    gt_files = sorted((synthetic_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    evaluated_ids = {label_id for label_id in range(34)} - {0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30}
    for gt_file in gt_files:
        stem = gt_file.name[: -len("_gtFine_labelIds.png")]
        prediction = out / "predictions" / gt_file.parent.name / f"{stem}_leftImg8bit.png"
        colour = out / "color" / gt_file.parent.name / f"{stem}_leftImg8bit.png"
        with Image.open(prediction) as image, Image.open(gt_file) as gt:
            assert image.mode == "L" and image.size == gt.size
            assert set(np.unique(np.asarray(image)).tolist()) <= evaluated_ids
        with Image.open(colour) as image:
            assert image.mode == "RGB" and image.size == gt.size
    written = json.loads((out / "metrics.json").read_text())
    assert written["num_images"] == len(gt_files)
    assert written["miou"] == pytest.approx(evaluate_prediction_dir(out / "predictions", synthetic_root)["miou"])
    # the written files are in the official result format: its own matching finds them
    assert_same_as_official(written_as_floats(written), official_evaluation(gt_files, out / "predictions",
                                                                               monkeypatch))

    # the official-format files give the same numbers as validation during training
    _, val_loader = build_dataloaders(tiny_config, torch.device("cpu"))
    in_training = evaluate(model, val_loader, torch.device("cpu"))
    assert written["miou"] == pytest.approx(in_training["miou"], abs=1e-9)
    assert written["pixel_accuracy"] == pytest.approx(in_training["pixel_accuracy"], abs=1e-9)

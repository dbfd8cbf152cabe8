"""The training engine: it learns, reports, checkpoints, resumes exactly, and stops on divergence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import seg.engine
from helpers import NanLoss
from seg.checkpoint import load_checkpoint, model_from_checkpoint
from seg.config import NUM_CLASSES, Config, TrainConfig
from seg.data.cityscapes import build_dataloaders
from seg.data.labels import CLASS_NAMES
from seg.engine import EpochResult, autocast_dtype, evaluate, fit, precision_settings, select_device, train_one_epoch
from seg.errors import CheckpointError, ConfigError, DivergenceError
from seg.metrics import confusion_matrix, segmentation_metrics


def constant_prediction_miou(loader) -> float:
    """The best mIoU a model that predicts one class everywhere gets on ``loader``."""
    targets = torch.cat([target.reshape(-1) for _, target in loader])
    return max(segmentation_metrics(confusion_matrix(torch.full_like(targets, c), targets))["miou"]
               for c in range(NUM_CLASSES))


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype(torch.device("cpu"), amp=True) is None  # amp is the CUDA setting
    assert autocast_dtype(torch.device("cpu"), amp=False, cpu_amp=True) == torch.bfloat16
    cpu = torch.device("cpu")
    assert precision_settings(TrainConfig(), cpu) == (None, False)
    assert precision_settings(TrainConfig(cpu_amp=True), cpu) == (torch.bfloat16, True)
    assert precision_settings(TrainConfig(cpu_amp=True, channels_last=False), cpu) == (torch.bfloat16, False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device"):
            select_device("cuda")


def test_training_lowers_the_loss_and_beats_a_constant_prediction(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.epochs": 8, "optim.lr": 0.02, "data.hflip": False,
                                      "data.color_jitter": 0.0})
    reported: list[EpochResult] = []

    def on_epoch_end(result: EpochResult) -> None:
        # called once the epoch's checkpoints are on disk
        assert load_checkpoint(result.checkpoint_dir / "last.pt")["epoch"] == result.epoch
        assert (result.checkpoint_dir / "best.pt").is_file() or not result.is_best
        reported.append(result)

    result = fit(cfg, tmp_path, on_epoch_end=on_epoch_end)
    assert [r.epoch for r in reported] == list(range(1, 9))
    losses = [r.metrics["train_loss"] for r in reported]
    assert losses[-1] < 0.7 * losses[0], losses
    _, val_loader = build_dataloaders(cfg, torch.device("cpu"))
    baseline = constant_prediction_miou(val_loader)
    print(f"losses {losses}, best mIoU {result.best_miou:.4f}, constant prediction {baseline:.4f}")
    assert result.best_miou > 2 * baseline, (result.best_miou, baseline)
    assert result.best_miou == max(r.metrics["val_miou"] for r in reported)
    assert reported[result.best_epoch - 1].is_best
    expected_keys = {"train_loss", "val_loss", "val_miou", "val_pixel_accuracy", "val_mean_class_accuracy", "lr",
                     "epoch_seconds"} | {f"val_iou/{name}" for name in CLASS_NAMES}
    assert set(reported[0].metrics) == expected_keys
    assert result.history[-1] == {"epoch": 8, **reported[-1].metrics}
    # best.pt holds the best epoch's weights and reproduces its metrics
    model, saved_cfg = model_from_checkpoint(tmp_path / "best.pt")
    assert saved_cfg == cfg
    metrics = evaluate(model, val_loader, torch.device("cpu"))
    assert metrics["miou"] == pytest.approx(result.best_miou, abs=1e-6)


def test_fit_removes_what_an_interrupted_checkpoint_write_left(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.epochs": 1, "train.max_steps_per_epoch": 1})
    stale = [tmp_path / ".last.pt.k2j4x.tmp", tmp_path / ".best.pt.4242.link"]
    unrelated = tmp_path / ".notes.tmp"
    for path in [*stale, unrelated]:
        path.write_bytes(b"partial")
    fit(cfg, tmp_path)
    assert not any(path.exists() for path in stale) and unrelated.exists()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "last.pt"]


def test_cpu_bf16_training_converges_like_fp32(tiny_config: Config, tmp_path: Path) -> None:
    """train.cpu_amp: bf16 autocast + channels_last on CPU reaches what fp32 reaches."""
    cfg = tiny_config.with_overrides({"train.epochs": 6, "optim.lr": 0.02, "data.hflip": False,
                                      "data.color_jitter": 0.0})
    fp32 = fit(cfg, tmp_path / "fp32")
    bf16 = fit(cfg.with_overrides({"train.cpu_amp": True}), tmp_path / "bf16")
    losses = [entry["train_loss"] for entry in bf16.history]
    print(f"fp32 best mIoU {fp32.best_miou:.4f}, bf16 {bf16.best_miou:.4f}; bf16 losses {losses}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert bf16.best_miou > 0.8 * fp32.best_miou, (bf16.best_miou, fp32.best_miou)
    model, _ = model_from_checkpoint(tmp_path / "bf16" / "best.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 master weights


def test_resuming_after_epoch_one_ends_like_an_uninterrupted_run(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.epochs": 2, "train.max_steps_per_epoch": 2})
    straight = fit(cfg, tmp_path / "straight")

    class Crash(Exception):
        pass

    def crash_after_first_epoch(result: EpochResult) -> None:
        torch.rand(5)  # a callback's random draws must not leak into training
        if result.epoch == 1:
            raise Crash

    with pytest.raises(Crash):  # fit lets the callback's exception through
        fit(cfg, tmp_path / "resumed", on_epoch_end=crash_after_first_epoch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = fit(cfg, tmp_path / "resumed", resume=tmp_path / "resumed" / "last.pt")

    def without_time(history: list[dict]) -> list[dict]:  # NaN (classes never seen) made comparable
        return [{k: None if math.isnan(v) else v for k, v in h.items() if k != "epoch_seconds"} for h in history]

    assert without_time(resumed.history) == without_time(straight.history)  # same seed, same numbers
    assert (resumed.best_miou, resumed.best_epoch) == (straight.best_miou, straight.best_epoch)
    final_straight = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    final_resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


def test_resuming_with_another_model_is_refused(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.epochs": 1, "train.max_steps_per_epoch": 1})
    fit(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="model.arch=fcn32s"):
        fit(cfg.with_overrides({"model.arch": "fcn8s"}), tmp_path / "other", resume=tmp_path / "last.pt")


def test_nan_loss_stops_training_before_any_step_or_checkpoint(tiny_config: Config, tmp_path: Path,
                                                               nan_loss: None) -> None:
    with pytest.raises(DivergenceError, match=r"epoch 1, step 1/3 .*optim\.lr") as error:
        fit(tiny_config, tmp_path)
    assert (error.value.epoch, error.value.step) == (1, 1) and math.isnan(error.value.loss)
    assert not (tmp_path / "last.pt").exists()

    # and no optimiser step is taken on the bad loss
    model = nn.Conv2d(3, NUM_CLASSES, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, NUM_CLASSES, (2, 8, 8)))]
    with pytest.raises(DivergenceError):
        train_one_epoch(model, batches, optimizer, scheduler, NanLoss(nn.CrossEntropyLoss()), torch.device("cpu"))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


class NanAtStep(nn.Module):
    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.calls, self.bad_step = 0, bad_step

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, target)
        return loss * math.inf if self.calls == self.bad_step else loss


def test_deferred_check_names_the_first_bad_step() -> None:
    # the CUDA path, which reads the loss only every log_every steps, run on the CPU
    model = nn.Conv2d(3, NUM_CLASSES, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, NUM_CLASSES, (2, 8, 8))) for _ in range(7)]
    stats = train_one_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), torch.device("cpu"),
                            log_every=3, check_every_step=False)
    assert stats["steps"] == 7 and math.isfinite(stats["loss"])
    loss_fn = NanAtStep(bad_step=2)
    with pytest.raises(DivergenceError, match="loss is inf at epoch 4, step 2/7") as error:
        train_one_epoch(model, batches, optimizer, scheduler, loss_fn, torch.device("cpu"), epoch=4,
                        log_every=3, check_every_step=False)
    assert loss_fn.calls == 3  # found at the first read, after step 3
    assert error.value.step == 2


def test_step_cap_grad_clip_and_eval_every(tiny_config: Config, tmp_path: Path) -> None:
    cfg = tiny_config.with_overrides({"train.epochs": 2, "train.eval_every": 2, "train.max_steps_per_epoch": 1,
                                      "optim.grad_clip": 1.0})
    result = fit(cfg, tmp_path)
    first, second = result.history
    assert "val_miou" not in first and "val_miou" in second  # validated every 2nd epoch and at the end
    assert result.best_epoch == 2
    assert load_checkpoint(tmp_path / "last.pt")["scheduler"]["last_epoch"] == 2  # one step per epoch


def test_median_frequency_weights_reach_the_loss(tiny_config: Config, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real_build_loss = seg.engine.build_loss

    def spy(cfg, class_weights=None):
        seen["weights"] = class_weights
        return real_build_loss(cfg, class_weights)

    monkeypatch.setattr(seg.engine, "build_loss", spy)
    cfg = tiny_config.with_overrides({"train.epochs": 1, "train.max_steps_per_epoch": 1,
                                      "train.class_weights": "median_frequency"})
    fit(cfg, tmp_path)
    assert seen["weights"] is not None and seen["weights"].shape == (NUM_CLASSES,)


def test_evaluate_scores_a_perfect_prediction_as_one() -> None:
    # "images" are one-hot targets, so the identity is a perfect model
    targets = torch.randint(0, NUM_CLASSES, (2, 3, 16, 16))
    targets[0, 0, :4] = 255  # ignored pixels
    batches = [(nn.functional.one_hot(t.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(0, 3, 1, 2).float() * 20,
                t) for t in targets]
    metrics = evaluate(nn.Identity(), batches, torch.device("cpu"))
    assert metrics["miou"] == 1.0 and metrics["pixel_accuracy"] == 1.0
    assert metrics["loss"] < 1e-6
    assert set(metrics["iou"]) == set(CLASS_NAMES)


def test_overlay_panel_is_image_ground_truth_and_prediction_side_by_side() -> None:
    from seg.data.labels import PALETTE
    from seg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from seg.visualize import overlay_panel

    rgb = torch.rand(3, 8, 10)
    image = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    target = torch.zeros(8, 10, dtype=torch.long)  # road
    target[0] = 255  # ignored: black
    pred = torch.full((8, 10), 10)  # sky
    panel = overlay_panel(image, target, pred)
    assert panel.shape == (8, 3 * 10 + 2 * 4, 3) and panel.dtype.name == "uint8"
    assert abs(panel[:, :10].astype(int) - (rgb.permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert (panel[1:, 14:24] == PALETTE[0]).all() and (panel[0, 14:24] == 0).all()
    assert (panel[:, 28:] == PALETTE[10]).all()
    assert (panel[:, 10:14] == 255).all()  # white gap


def test_on_step_is_called_after_every_step_with_the_loss_on_cpu(tiny_config: Config, tmp_path: Path) -> None:
    calls: list[tuple[int, int, int | None, float | None]] = []
    fit(tiny_config, tmp_path, on_step=lambda *args: calls.append(args))
    steps = 6 // tiny_config.data.batch_size  # 6 train images, the last incomplete batch dropped
    assert [(epoch, step, total) for epoch, step, total, _ in calls] == \
        [(epoch, step, steps) for epoch in (1, 2) for step in range(1, steps + 1)]
    assert all(isinstance(loss, float) and math.isfinite(loss) for *_, loss in calls)


def test_train_script_draws_a_bar_over_the_steps_only_on_a_terminal(capsys: pytest.CaptureFixture) -> None:
    from helpers import load_script

    bar = load_script("train").StepBar(epochs=2, enabled=True)
    for step in (1, 2, 3):
        bar(1, step, 3, 0.5)
    assert bar.bar.n == 3 and "loss=0.5000" in str(bar.bar)
    bar(2, 1, 3, None)  # a new epoch: a new bar
    assert bar.bar.n == 1 and bar.bar.desc == "epoch 2/2"
    bar.close()
    assert "epoch 1/2" in capsys.readouterr().err
    silent = load_script("train").StepBar(epochs=2, enabled=False)
    silent(1, 1, 3, 0.5)
    assert silent.bar is None

"""train.py: metrics, aggregation, schedule, learning, resume and refusing mixed runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_train_args

import batching
import run_folders as rf
import train as tr
from build_datasets import load_dataset
from metrics import class_f1, classification_metrics, confusion
from model import HannunConfig, HannunNet


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    # true \ pred    N  A  O  ~
    cm = np.array([[5, 1, 0, 0],   # N
                   [1, 3, 1, 0],   # A
                   [0, 0, 2, 2],   # O
                   [0, 0, 0, 0]])  # ~ (never true, never predicted)
    y_true = np.repeat(np.arange(4), cm.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(4), row) for row in cm])
    m = classification_metrics(y_true, y_pred)
    assert m["confusion"] == cm.tolist()
    f1_n, f1_a, f1_o = 2 * 5 / (6 + 6), 2 * 3 / (5 + 4), 2 * 2 / (4 + 3)
    assert m["f1_N"] == pytest.approx(f1_n) and m["f1_A"] == pytest.approx(f1_a)
    assert m["f1_O"] == pytest.approx(f1_o) and m["f1_~"] == 0.0
    assert m["challenge_f1"] == pytest.approx((f1_n + f1_a + f1_o) / 3)
    assert m["macro_f1"] == pytest.approx((f1_n + f1_a + f1_o) / 4)
    assert m["accuracy"] == pytest.approx(10 / 15)


def test_batched_confusion_matches_a_plain_count() -> None:
    """The bootstrap scores 1000 resamples in one bincount; each matrix must equal a plain
    count of its own (true, predicted) pairs, and mismatched inputs are refused."""
    rng = np.random.default_rng(1)
    y_true, y_pred = rng.integers(0, 4, (3, 5, 50)), rng.integers(0, 4, (3, 5, 50))
    batched = confusion(y_true, y_pred)
    assert batched.shape == (3, 5, 4, 4)
    for i in range(3):
        for j in range(5):
            plain = np.zeros((4, 4), int)
            for t, q in zip(y_true[i, j], y_pred[i, j], strict=True):
                plain[t, q] += 1
            assert (batched[i, j] == plain).all()
            tp, denom = np.diag(plain), plain.sum(0) + plain.sum(1)
            expected = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0)
            assert class_f1(batched)[i, j] == pytest.approx(expected)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion(y_true[0, 0], y_pred[0])
    with pytest.raises(ValueError, match="class indices"):
        confusion(np.array([0, 4]), np.array([0, 1]))


def test_mean_and_vote_aggregation_differ_as_designed() -> None:
    # 3 valid steps: two weak votes for A, one confident N; the 4th step is padding.
    logits = torch.tensor([[[0.0, 0.1, 0, 0], [0.0, 0.1, 0, 0], [5.0, 0, 0, 0], [0, 0, 0, 9.0]]])
    steps = torch.tensor([3])
    assert tr.aggregate_steps(logits, steps, "vote").item() == 1
    assert tr.aggregate_steps(logits, steps, "mean").item() == 0
    with pytest.raises(ValueError):
        tr.aggregate_steps(logits, steps, "max")


def test_step_schedule_is_a_function_of_the_step() -> None:
    cfg = tr.TrainConfig(epochs=4, lr=1e-3, milestones=(0.5, 0.75), gamma=0.1)
    lrs = [tr.lr_at(cfg, s, steps_per_epoch=10) for s in range(40)]
    assert lrs[0] == lrs[19] == 1e-3
    assert lrs[20] == lrs[29] == pytest.approx(1e-4)
    assert lrs[30] == lrs[39] == pytest.approx(1e-5)


def test_batches_bucket_by_length_and_mask_padding(tiny_data: Path) -> None:
    ds = load_dataset(tiny_data)
    idx = ds.indices("train")
    batches = batching.length_buckets(ds.lengths, idx, 16, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == sorted(idx.tolist())
    spread = [np.ptp(ds.lengths[b]) for b in batches]
    assert max(spread) < np.ptp(ds.lengths[idx])
    batcher = batching.Batcher(ds, batching.Normalizer.fit(ds, idx), 256, torch.device("cpu"))
    x, y, steps = batcher(batches[0])
    lengths = ds.lengths[batches[0]]
    assert x.shape[2] % 256 == 0 and x.shape[2] - lengths.max() < 256
    for row, n in zip(x[:, 0], lengths, strict=True):
        assert not row[n:].any() and row[:n].abs().sum() > 0
    assert steps.tolist() == [max(1, n // 256) for n in lengths]
    x, _, steps = batcher(batches[0], crop=512, rng=np.random.default_rng(1))
    assert x.shape[2] == 512 and steps.tolist() == [2] * len(lengths)


def test_short_training_lowers_the_loss(tiny_data: Path, tmp_path: Path) -> None:
    tr.main(tiny_train_args(tiny_data, tmp_path / "run", "--epochs", "5", "--milestones", "0.8"))
    history = pd.read_csv(tmp_path / "run" / "dense" / tr.HISTORY)
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0]
    metrics = json.loads((tmp_path / "run" / "dense" / tr.METRICS).read_text())
    assert set(metrics) >= {"val", "test", "parameters", "seconds_per_epoch"}
    assert metrics["test"]["records"] == 32 and len(metrics["val"]["confusion"]) == 4
    config = json.loads((tmp_path / "run" / "dense" / rf.CONFIG).read_text())
    assert config["flags"]["epochs"] == 5 and config["code_version"]
    # per-record class probabilities (softmax of the mean logits): rows sum to 1, their argmax
    # is the predicted class (the mean aggregate), and metrics.json does not hold them
    predictions = pd.read_csv(tmp_path / "run" / "dense" / tr.PREDICTIONS, keep_default_na=False)
    probs = predictions[list(tr.PROBABILITY_COLUMNS)].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and (probs >= 0).all()
    assert (np.array(list("NAO~"))[probs.argmax(1)] == predictions["predicted"]).mean() > 0.95  # 5-digit ties
    assert "probabilities" not in metrics["test"]


def test_interrupted_run_resumes_to_the_same_weights(tiny_data: Path, tmp_path: Path) -> None:
    """A run killed mid-epoch and re-run ends with exactly the weights of one that was not."""
    args = tr.parse_args(tiny_train_args(tiny_data, tmp_path / "x"))
    cfg = tr.config_from_args(args)
    ds = load_dataset(tiny_data)
    cpu = torch.device("cpu")

    def fresh() -> HannunNet:
        torch.manual_seed(cfg.seed)
        return HannunNet(cfg.model)

    whole = fresh()
    (tmp_path / "whole").mkdir()
    tr.train(whole, ds, cfg, tmp_path / "whole", cpu, bf16=False, quiet=True)

    class Killed(Exception):
        pass

    def kill_at_step_11(model: torch.nn.Module, step: int) -> None:
        if step == 11:  # in the middle of epoch 2 (8 batches per epoch)
            raise Killed

    (tmp_path / "cut").mkdir()
    with pytest.raises(Killed):
        tr.train(fresh(), ds, cfg, tmp_path / "cut", cpu, bf16=False, checkpoint_minutes=0,
                 after_step=kill_at_step_11, quiet=True)
    assert torch.load(tmp_path / "cut" / tr.CHECKPOINT, weights_only=True)["state"]["step"] == 10
    resumed = fresh()
    history = tr.train(resumed, ds, cfg, tmp_path / "cut", cpu, bf16=False, quiet=True)
    assert len(history) == cfg.epochs
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_run_killed_during_the_last_evaluation_still_records_it(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = tr.parse_args(tiny_train_args(tiny_data, tmp_path / "x"))
    cfg = tr.config_from_args(args)
    ds = load_dataset(tiny_data)
    torch.manual_seed(0)
    model = HannunNet(cfg.model)
    real_evaluate, calls = tr.evaluate, []

    def evaluate_then_die(*a, **k):  # noqa: ANN002, ANN003
        calls.append(1)
        if len(calls) == cfg.epochs:  # the last epoch's evaluation
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(tr, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        tr.train(model, ds, cfg, tmp_path, torch.device("cpu"), bf16=False, checkpoint_minutes=0, quiet=True)
    monkeypatch.setattr(tr, "evaluate", real_evaluate)
    history = tr.train(model, ds, cfg, tmp_path, torch.device("cpu"), bf16=False, quiet=True)
    assert [h["epoch"] for h in history] == list(range(1, cfg.epochs + 1))


def test_finished_run_is_not_retrained_and_other_flags_are_refused(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    tr.main(tiny_train_args(tiny_data, out, "--epochs", "1"))
    stamp = (out / "dense" / tr.FINAL).stat().st_mtime_ns
    capsys.readouterr()
    tr.main(tiny_train_args(tiny_data, out, "--epochs", "1", "--device", "cpu"))
    assert "is finished" in capsys.readouterr().out
    assert (out / "dense" / tr.FINAL).stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match=r"other flags: --lr 0.001 \(now 0.01\)"):
        tr.main(tiny_train_args(tiny_data, out, "--epochs", "1", "--lr", "0.01"))


def test_plateau_schedule_keeps_the_best_validation_weights(tiny_data: Path, tmp_path: Path) -> None:
    tr.main(tiny_train_args(tiny_data, tmp_path / "p", "--schedule", "plateau", "--epochs", "3",
                            "--patience", "1", "--early-stop", "2"))
    history = pd.read_csv(tmp_path / "p" / "dense" / tr.HISTORY)
    metrics = json.loads((tmp_path / "p" / "dense" / tr.METRICS).read_text())
    assert metrics["val"]["loss"] == pytest.approx(history["val_loss"].min(), rel=1e-4)


def test_a_training_keeps_its_console_output_in_a_log(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """train.log in the run folder: a dated header with the code version at each start, the
    epoch lines, the interruption, and the resumed run appended (progress bars left out)."""
    out = tmp_path / "run"
    argv = ["--data", str(tiny_data), "--out", str(out), "--width", "0.125", "--epochs", "2", "--crop", "1024",
            "--batch-size", "16"]
    real, steps = tr.train_step, []

    def interrupted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        steps.append(1)
        if len(steps) == 8:  # Ctrl-C in the second epoch
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(tr, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.main(argv)
    monkeypatch.setattr(tr, "train_step", real)
    tr.main(argv)
    log = (out / "dense" / tr.LOG).read_text()
    headers = [line for line in log.splitlines() if line.startswith("=== ")]
    assert len(headers) == 2 and all(f"code {rf.code_version()}" in h for h in headers)
    assert "dense: " in log and "epoch   1" in log and "epoch   2" in log
    assert "stopped: KeyboardInterrupt" in log and "resuming" in log and "\r" not in log
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    stop = next(i for i, line in enumerate(lines) if line.startswith("stopped: KeyboardInterrupt"))
    assert starts[0] < stop < starts[1] < next(i for i, line in enumerate(lines) if line.startswith("epoch   2"))


def test_a_diverging_run_stops_at_the_step_and_writes_nothing(tiny_data: Path, tmp_path: Path) -> None:
    """An LR that blows the weights up must not end in NaN weights and metrics with exit 0."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"training stopped at a non-finite loss at step \d+ .*lower --lr"):
        tr.main(tiny_train_args(tiny_data, out, "--lr", "1e30", "--clip", "0"))
    assert not (out / "dense" / tr.FINAL).exists() and not (out / "dense" / tr.METRICS).exists()
    assert not (out / "dense" / tr.CHECKPOINT).exists()  # the first epoch never finished


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "-1"], ["--lr", "inf"], ["--lr", "nan"],
                                  ["--weight-decay", "nan"], ["--milestones", "0.5,x"],
                                  ["--milestones", "1.5"], ["--width", "0"], ["--crop", "100"],
                                  ["--schedule", "cosine"]])
def test_bad_flags_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tr.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("flag", [["--layer-fraction", "nosuchlayer=0.1"], ["--dense-layers", "stem,nosuch"]])
def test_unknown_layers_are_refused_before_any_training(flag: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="nosuch"):
        tr.main(["--data", str(tmp_path / "no-data-needed"), "--out", str(tmp_path / "run"), *flag])
    assert not (tmp_path / "run").exists()


def test_missing_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no complete data set"):
        tr.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")])


def test_runs_made_before_a_flag_existed_still_resume(tiny_data: Path, tmp_path: Path) -> None:
    """A config.json without a later-added flag counts as that flag's default; --max-steps
    caps a training at a few batches (a smoke test of a configuration)."""
    out = tmp_path / "run"
    tr.main(tiny_train_args(tiny_data, out, "--epochs", "1", "--max-steps", "2"))
    history = pd.read_csv(out / "dense" / tr.HISTORY)
    assert history["step"].tolist() == [2]
    config = json.loads((out / "dense" / rf.CONFIG).read_text())
    del config["flags"]["max_steps"]
    (out / "dense" / rf.CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"--max-steps 0 \(now 2\)"):
        tr.main(tiny_train_args(tiny_data, out, "--epochs", "1", "--max-steps", "2"))
    tr.main(tiny_train_args(tiny_data, out, "--epochs", "1"))  # default: accepted, finished


def test_bf16_is_opt_in_on_the_cpu_guarded_and_older_numerics_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    """'auto' trains in fp32 on the CPU; --amp bf16 checks every conv against fp32 and stores
    the ones run in fp32; a folder made before that check (numerics 1) is refused."""
    assert not tr.use_bf16("auto", torch.device("cpu"))
    out = tmp_path / "run"
    argv = tiny_train_args(tiny_data, out, "--epochs", "1", "--max-steps", "2", "--amp", "bf16")
    tr.main(argv)
    metrics = json.loads((out / "dense" / tr.METRICS).read_text())
    convs = {n for n, m in HannunNet(HannunConfig(width=0.125)).named_modules() if isinstance(m, torch.nn.Conv1d)}
    assert metrics["bf16"] is True and set(metrics["bf16_fp32_convs"]) <= convs
    plain = tmp_path / "plain"
    tr.main(tiny_train_args(tiny_data, plain, "--epochs", "1", "--max-steps", "2"))
    metrics = json.loads((plain / "dense" / tr.METRICS).read_text())
    assert metrics["bf16"] is False and metrics["bf16_fp32_convs"] == []
    config = json.loads((out / "dense" / rf.CONFIG).read_text())
    assert config["flags"]["numerics_version"] == tr.NUMERICS_VERSION == 2
    del config["flags"]["numerics_version"]  # as a folder made before the check has it
    (out / "dense" / rf.CONFIG).write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"--numerics-version 1 \(now 2\)"):
        tr.main(argv)


def test_bf16_on_a_cpu_without_native_bf16_is_refused(monkeypatch):
    """--amp bf16 on an AVX2-only host would be emulated far slower than fp32: refused, named."""
    assert tr.cpu_has_native_bf16("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert tr.cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert not tr.cpu_has_native_bf16("flags\t: fpu sse avx avx2 fma\n")
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit, match="no native bf16"):
        tr.use_bf16("bf16", torch.device("cpu"))
    assert tr.use_bf16("fp32", torch.device("cpu")) is False


def test_a_folder_made_before_a_flag_existed_resumes_under_its_default(tiny_data, tmp_path):
    """A run folder's config.json written before a flag was added to train.py (e.g. the
    multi-session full-width grid, made before --max-retries) resumes: the missing flag counts
    as its default, which is what the older code did."""
    data = tiny_data
    args = tr.parse_args(["--data", str(data), "--retrain", "lr_rewind"])
    flags = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
             for k, v in vars(args).items() if k not in ("model", "out")}
    flags.update(model=asdict(args.model), layer_fraction=[])  # as train.run writes them
    for added in {"max_retries", *rf.ADDED_FLAGS}:
        old = {k: v for k, v in flags.items() if k != added}
        run_dir = tmp_path / added
        run_dir.mkdir()
        rf.prepare_run(run_dir, old, data)
        assert rf.prepare_run(run_dir, flags, data)["flags"] == old, added

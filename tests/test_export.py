"""Exported tickets: exact round trip, quantised variants, size and FLOP accounting, the
faster inference paths, ONNX, and predict.py on real and synthetic records."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_FLAGS, tiny_train_args, write_wfdb
from torch import nn

import export_ticket as et
import operating_point
import plot_results
import predict
import prune as pm
import run_experiments
import run_folders as rf
import train as tr
from build_datasets import synthetic_record

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cinc2017" / "training2017"


@pytest.fixture(scope="module")
def ticket_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished pruning round (2 rounds of 60 %, 6.25x) of a tiny network."""
    seed_dir = tmp_path_factory.mktemp("exp") / "seed0"
    tr.main(tiny_train_args(tiny_data, seed_dir, "--retrain", "lr_rewind", "--prune-fraction", "0.6",
                            "--rounds", "2", "--epochs", "1"))
    return seed_dir / "lr_rewind" / "round_02"


@pytest.fixture(scope="module")
def exported(ticket_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ticket")
    report = et.main(["--run", str(ticket_run), "--out", str(out), "--data", str(tiny_data),
                      "--latency-seconds", "0.05", "--threads", "1"])
    return out, report


def _logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(2, 1, 2048))


def test_fp32_ticket_is_the_trained_network_exactly(ticket_run: Path, exported: tuple[Path, dict]) -> None:
    out, report = exported
    cfg, state, masks, _, _ = et.read_run(ticket_run)
    model, meta = et.load_ticket(out / "ticket-fp32.npz")
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    for name, w in pm.prunable_weights(model).items():
        assert not w[~masks[name]].any(), name
    assert report["fp32_roundtrip_exact"] and meta["model"]["width"] == cfg.width


def test_quantised_tickets_keep_the_mask_and_stay_close(ticket_run: Path, exported: tuple[Path, dict]) -> None:
    out, report = exported
    cfg, state, masks, _, _ = et.read_run(ticket_run)
    reference = _logits(et.build_model(cfg, state))
    for dtype, tol in (("fp16", 0.02), ("int8", 0.2)):
        model, _ = et.load_ticket(out / f"ticket-{dtype}.npz")
        for name, w in pm.prunable_weights(model).items():
            assert not w[~masks[name]].any(), (dtype, name)
        err = (_logits(model) - reference).abs().max() / reference.abs().max()
        assert err < tol, (dtype, float(err))
    f1 = report["f1"]
    assert f1["exported fp32"] == f1["trained ticket (fp32)"]  # the same network, the same answers
    for label in ("exported fp16", "exported int8"):  # the stated tolerance: 0.05 challenge F1
        for split in ("val", "test"):
            key = f"{split}_challenge_f1"
            assert abs(f1[label][key] - f1["trained ticket (fp32)"][key]) <= 0.05, (label, key)


@pytest.mark.parametrize("density, kind", [(0.5, "bits"), (0.01, "gaps16"), (1e-6, "gaps32")])
def test_index_encodings_round_trip(density: float, kind: str) -> None:
    shape = (64, 64, 32) if kind != "gaps32" else (1000, 200, 16)  # 3.2 M weights, 3 survivors
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=gen) < density
    mask.view(-1)[[0, -1]] = True  # a survivor at each end
    weight = torch.randn(shape, generator=gen) * mask
    values, got_kind, index = et.encode_layer(weight, mask)
    assert got_kind == kind
    assert np.array_equal(et.decode_mask(kind, index, shape), mask.numpy().ravel())
    assert np.array_equal(values, weight[mask].numpy())
    alive = int(mask.sum())
    assert len(index) == {"bits": -(-mask.numel() // 8), "gaps16": 2 * alive, "gaps32": 4 * alive}[kind]


def test_size_and_flop_accounting(ticket_run: Path, exported: tuple[Path, dict]) -> None:
    out, report = exported
    _, _, masks, _, _ = et.read_run(ticket_run)
    alive, total = pm.count(masks)
    c = report["counts"]
    assert (c["nonzero_weights"], c["prunable_weights"]) == (alive, total)
    model = et.build_model(*et.read_run(ticket_run)[:2])
    biases_and_bn = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") or "bn" in n)
    assert c["with_biases_and_bn"] == alive + biases_and_bn
    b = report["bytes"]
    assert b["ticket_fp32"] == (out / "ticket-fp32.npz").stat().st_size
    assert b["ticket_int8"] < b["ticket_fp16"] < b["ticket_fp32"] < b["dense_fp32"]
    # the fp32 ticket stores each survivor in 4 bytes, an index of at most 1 bit per weight,
    # biases and BatchNorm (with its running statistics) in fp32, and < 4 KB of scales, JSON, headers
    cfg, state, _, _, _ = et.read_run(ticket_run)
    others = 4 * sum(state[k].numel() for k in et.other_keys(et.build_model(cfg, state)))
    assert b["ticket_fp32"] <= 4 * alive + total / 8 + others + 4096
    # FLOPs by hand: a conv with 3 outputs, 2 inputs, kernel 4 on 10 samples -> 7 positions
    net = nn.Sequential(nn.Conv1d(2, 3, 4), nn.Flatten(), nn.Linear(21, 5))
    with torch.no_grad():
        net[0].weight[0] = 0  # 8 of the 24 conv weights
    dense, sparse = et.flops_per_record(net, torch.randn(1, 2, 10))
    assert dense == 2 * (7 * 24 + 21 * 5) and sparse == 2 * (7 * 16 + 21 * 5)
    assert report["flops"]["sparse"] < report["flops"]["dense"]
    assert (out / "report.md").read_text().count("|") > 20


def test_a_ticket_records_its_data_and_af_operating_point(ticket_run: Path, tiny_data: Path,
                                                         exported: tuple[Path, dict], tmp_path: Path) -> None:
    """Exported from a run: the fingerprint and split of the data it was trained on, the
    length of its training windows, and the
    AF threshold chosen on the run's validation probabilities (operating_point), in every
    dtype's metadata and in the report; restamp adds metadata and leaves the weights' arrays
    byte for byte as they were."""
    out, report = exported
    records = pd.read_csv(tiny_data / "records.csv", keep_default_na=False, dtype=str)
    op = operating_point.shipped_threshold(ticket_run)
    assert op is not None and op["chosen_on"] == "val"
    for dtype in et.DTYPES:
        meta = et.load_ticket(out / f"ticket-{dtype}.npz")[1]
        assert meta["data_fingerprint"] == rf.data_fingerprint(tiny_data)
        assert meta["split"] == et.split_of(records["record"], records["split"])
        assert meta["split"]["test"] == (records["split"] == "test").sum()
        assert meta["af_operating_point"] == op
        assert meta["window"] == 1024  # trained on windows (TINY_FLAGS' --crop): predict.py --windows reads them
    assert report["af_operating_point"] == op and report["data_fingerprint"] == meta["data_fingerprint"]
    et.check_ticket_data(meta, tiny_data, out / "ticket-fp32.npz")  # its own data: no refusal
    copy = tmp_path / "t.npz"
    shutil.copy(out / "ticket-fp32.npz", copy)
    et.restamp(copy, {"af_operating_point": {**op, "threshold": 0.5}})
    with np.load(out / "ticket-fp32.npz") as a, np.load(copy) as b:
        assert all(a[k].tobytes() == b[k].tobytes() for k in a.files if k != "meta")
        assert json.loads(b["meta"].tobytes())["af_operating_point"]["threshold"] == 0.5


def test_damaged_tickets_are_clear_errors(exported: tuple[Path, dict], tmp_path: Path) -> None:
    data = (exported[0] / "ticket-fp32.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with np.load(exported[0] / "ticket-fp32.npz") as z:
        arrays = {k: z[k] for k in z.files}
    bad_index = dict(arrays, index=np.full_like(arrays["index"], 255))  # survivors that do not add up
    np.savez(tmp_path / "index.npz", **bad_index)
    short = dict(arrays, others=arrays["others"][:-1])
    np.savez(tmp_path / "short.npz", **short)
    for name in ("cut.npz", "index.npz", "short.npz"):
        with pytest.raises(et.TicketError, match=f"{name}: not a readable ticket"):
            et.load_ticket(tmp_path / name)


def test_export_by_experiment_winner_and_dense_layers(tiny_data: Path, tmp_path: Path) -> None:
    """--exp --winner finds the seed's folder through results.csv; a run with a layer kept
    dense exports and loads back exactly."""
    exp = tmp_path / "exp"
    run_experiments.main(["--exp", str(exp), "--methods", "finetune", "--seeds", "0", "--controls", "",
                          "--prune-fraction", "0.5", "--rounds", "1", "--dense-layers", "stem",
                          "--data", str(tiny_data), *TINY_FLAGS[:-1], "--epochs", "1", "--quiet"])
    plot_results.main(["--exp", str(exp), "--tolerance", "0.99"])  # any pruned round wins
    out = tmp_path / "t"
    et.main(["--exp", str(exp), "--winner", "--out", str(out), "--dtypes", "fp32", "--latency-seconds", "0.01",
             "--threads", "1"])
    model, _ = et.load_ticket(out / "ticket-fp32.npz")
    _, state, masks, _, _ = et.read_run(exp / "seed0" / "finetune" / "round_01")
    assert "stem" not in masks and torch.equal(model.state_dict()["stem.weight"], state["stem.weight"])
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_fast_inference_paths_match(ticket_run: Path) -> None:
    cfg, state, _, _, _ = et.read_run(ticket_run)
    model = et.build_model(cfg, state)
    with torch.no_grad():  # make a block's inner channel dead: conv2 never reads channel 0
        model.blocks[2].conv2.weight[:, 0] = 0
    shrunk = et.shrink(model)
    assert shrunk.blocks[2].conv2.in_channels == model.blocks[2].conv2.in_channels - 1
    reference = _logits(model)
    assert torch.allclose(_logits(shrunk), reference, atol=1e-5)
    sparse = et.sparsify(shrunk, max_density=1.0)
    assert any(isinstance(m, et.SparseConv1d) for m in sparse.modules())
    assert torch.allclose(_logits(sparse), reference, atol=1e-4)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
                    reason="onnx/onnxruntime not installed (pip install -r requirements-export.txt)")
def test_onnx_export_matches_pytorch(ticket_run: Path, tmp_path: Path) -> None:
    cfg, state, _, _, _ = et.read_run(ticket_run)
    model, x = et.build_model(cfg, state), et.record_input(2048, cfg.stride)
    diff = et.export_onnx(model, x, tmp_path / "t.onnx")
    with torch.inference_mode():
        scale = float(model(x).abs().max())
    # fp32 through 33 convolutions in two libraries: the logits (here up to ~100) agree to
    # ~1e-6 of their size; an absolute 1e-4 failed on CPUs whose kernels sum in another order
    assert diff < 1e-5 * max(1.0, scale) and (tmp_path / "t.onnx").stat().st_size > 0


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
                    reason="onnx/onnxruntime not installed (pip install -r requirements-export.txt)")
def test_onnx_int8_is_the_shrunk_network_statically_quantised(ticket_run: Path, tiny_data: Path,
                                                               tmp_path: Path) -> None:
    import onnx  # noqa: PLC0415 - optional

    report = et.main(["--run", str(ticket_run), "--out", str(tmp_path), "--data", str(tiny_data), "--onnx",
                      "--calibration", "8", "--dtypes", "fp32", "--latency-seconds", "0.02", "--threads", "1"])
    fp32, int8 = (onnx.load(tmp_path / f) for f in ("ticket.onnx", "ticket-int8.onnx"))
    cfg, state, _, norm, _ = et.read_run(ticket_run)
    shrunk = et.shrink(et.build_model(cfg, state))
    convs = [i for i in fp32.graph.initializer if i.name.endswith("conv1.weight")]
    assert [i.dims[0] for i in convs] == [b.conv1.out_channels for b in shrunk.blocks]  # the shrunk network
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in int8.graph.node}
    assert report["onnx_int8_bytes"] < report["onnx_bytes"] and report["onnx_int8_calibration_records"] == 8
    label = "ONNX int8 static (onnxruntime)"
    assert label in report["latency_ms"] and label in report["f1"]
    x = et.calibration_inputs(tiny_data, norm, cfg.stride, 4)[0]
    want = shrunk(torch.from_numpy(x)).detach()
    got = et.OnnxModule(tmp_path / "ticket-int8.onnx")(torch.from_numpy(x))
    # the 1-epoch tiny network's logits are near 0 (max ~0.2), so 8-bit steps are large
    # relative to them; wrong scales or a wrong graph give errors many times the logits
    assert float((got - want).abs().max()) < 0.5 * float(want.abs().max())
    assert "ONNX int8" in (tmp_path / "report.md").read_text()


def test_bad_runs_and_tickets_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="model.pt missing"):
        et.main(["--run", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    np.save(tmp_path / "array.npy", np.zeros(3))
    for name in ("junk.npz", "empty.npz", "random.npz", "array.npy"):
        with pytest.raises(et.TicketError, match=f"{name}: not a ticket file") as exc:
            et.load_ticket(tmp_path / name)
        assert "allow_pickle" not in str(exc.value)
    with pytest.raises(et.TicketError, match="a folder, not a ticket file"):
        et.load_ticket(tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip header, nothing behind it
    with pytest.raises(et.TicketError, match="broken.npz: not a readable ticket"):
        et.load_ticket(tmp_path / "broken.npz")
    with pytest.raises(SystemExit):
        et.parse_args(["--out", "x", "--run", "a", "--dtypes", "int4"])


def test_damaged_or_diverged_runs_are_refused_by_name(ticket_run: Path, tmp_path: Path) -> None:
    """A truncated model.pt or mask.pt is named, with what to delete to redo it; a network
    with NaN weights is no ticket: neither exported nor loaded."""
    run = tmp_path / "seed0" / "lr_rewind" / "round_02"
    shutil.copytree(ticket_run.parent, tmp_path / "seed0" / "lr_rewind")
    for name in (tr.MASK, tr.FINAL):
        good = (run / name).read_bytes()
        (run / name).write_bytes(good[: len(good) // 2])
        with pytest.raises(et.TicketError, match=f"{name} is damaged .*delete .*round_02 and any later round"):
            et.read_run(run)
        (run / name).write_bytes(good)
    state = torch.load(run / tr.FINAL, weights_only=True)
    state["head.weight"][0, 0] = float("nan")
    torch.save(state, run / tr.FINAL)
    with pytest.raises(SystemExit, match="1 non-finite values .*it is no ticket"):
        et.main(["--run", str(run), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "ticket-fp32.npz").exists()
    with pytest.raises(SystemExit, match="checkpoint.pt is damaged .*restarts from its first step"):
        (run / tr.CHECKPOINT).write_bytes(b"PK\x03\x04garbage")
        rf.load_pt(run / rf.CHECKPOINT)


def test_a_ticket_with_nan_weights_is_not_loaded(exported: tuple[Path, dict], tmp_path: Path) -> None:
    with np.load(exported[0] / "ticket-fp32.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["values"][0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(et.TicketError, match="nan.npz: 1 non-finite values"):
        et.load_ticket(tmp_path / "nan.npz")


# --------------------------------------------------------------------------- predict.py


def _predict_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, list[dict], str]:
    code = predict.main([*argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_predict_synthetic_records_in_every_format(exported: tuple[Path, dict], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    ticket = str(exported[0] / "ticket-fp32.npz")
    x = synthetic_record("A", np.random.default_rng(3), fs=300, seconds=(12, 12))
    write_wfdb(tmp_path, "R1", x, fs=300)
    np.save(tmp_path / "r2.npy", x.astype(np.float64))
    np.savetxt(tmp_path / "r3.csv", x / 1000.0, header="lead_I", comments="")
    code, out, err = _predict_json(capsys, "--ticket", ticket, str(tmp_path / "R1.mat"))
    assert code == 0 and not err
    first = out[0]
    assert first["class"] in ("N", "A", "O", "~") and sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert first["seconds"] == pytest.approx(12, abs=0.01) and len(first["segments"]) == 12 * 200 // 256
    code, out, _ = _predict_json(capsys, "--ticket", ticket, "--fs", "300", str(tmp_path / "r2.npy"))
    assert code == 0 and out[0]["probabilities"] == first["probabilities"]  # the same samples
    code, out, _ = _predict_json(capsys, "--ticket", ticket, "--fs", "300", "--units", "mV", str(tmp_path / "r3.csv"))
    assert code == 0 and out[0]["class"] == first["class"]


def test_predict_errors_name_the_file_and_go_on(exported: tuple[Path, dict], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    ticket = str(exported[0] / "ticket-int8.npz")
    good = tmp_path / "good.npy"
    np.save(good, synthetic_record("N", np.random.default_rng(0), fs=300, seconds=(10, 10)).astype(np.float64))
    np.save(tmp_path / "short.npy", np.zeros(600))
    np.save(tmp_path / "two.npy", np.zeros((2, 3000)))
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(tmp_path / "nan.npy", np.full(3000, np.nan))
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "records").mkdir()
    cases = {"short.npy": "2.00 s long; at least 5 s", "two.npy": "shape (2, 3000)", "bad.npy": "unreadable",
             "nan.npy": "NaN", "gone.npy": "no such file", "empty.npy": "unreadable", "records": "a folder; give"}
    code, out, err = _predict_json(capsys, "--ticket", ticket, "--fs", "300", str(good),
                                   *(str(tmp_path / n) for n in cases))
    assert code == 1 and "class" in out[0]
    for name, message in cases.items():
        assert any(name in line and message in line for line in err.splitlines()), name
    code, _, err = _predict_json(capsys, "--ticket", ticket, "--fs", "20", str(good))
    assert code == 1 and "sampling rate 20 Hz" in err
    # wrong units or rate: refused with the flag to fix, not a confident wrong class
    x = np.load(good)
    np.save(tmp_path / "in_mv.npy", x / 1000)
    code, _, err = _predict_json(capsys, "--ticket", ticket, "--fs", "300", str(tmp_path / "in_mv.npy"))
    assert code == 1 and "too little for an ECG" in err and "pass --units mV" in err
    code, _, err = _predict_json(capsys, "--ticket", ticket, "--fs", "300", "--units", "mV", str(good))
    assert code == 1 and "too much for an ECG" in err and "drop --units mV" in err
    minute = tmp_path / "minute_at_300hz.npy"  # ~93 bpm at its true rate; at 4x too low a rate, 23 bpm
    np.save(minute, synthetic_record("N", np.random.default_rng(1), fs=300, seconds=(60, 60)).astype(np.float64))
    code, _, err = _predict_json(capsys, "--ticket", ticket, "--fs", "75", str(minute))
    assert code == 1 and "bpm at --fs 75" in err and "check --fs" in err
    code, out, err = _predict_json(capsys, "--ticket", ticket, "--fs", "75", "--no-checks", str(minute))
    assert code == 0 and "class" in out[0]
    rng = np.random.default_rng(5)
    for label in "NAO":  # real-looking records at their true rate pass
        x = synthetic_record(label, rng, fs=300, seconds=(20, 20)).astype(float)
        assert predict.MIN_BPM <= predict.heart_rate(x, 300) <= predict.MAX_BPM
    code, _, err = _predict_json(capsys, "--ticket", ticket, str(good))
    assert code == 1 and "pass --fs" in err


@pytest.mark.skipif(not (REAL / "A00001.mat").is_file(), reason=f"real CinC 2017 records not found at {REAL}")
def test_predict_a_real_cinc_record(exported: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _predict_json(capsys, "--ticket", str(exported[0] / "ticket-fp32.npz"), str(REAL / "A00001.mat"))
    assert code == 0 and out[0]["seconds"] == pytest.approx(30, abs=0.01)
    assert len(out[0]["segments"]) == 30 * 200 // 256 and out[0]["class"] in ("N", "A", "O", "~")

"""The C export (export_c.py, c/): compiles, matches PyTorch on real and synthetic records,
stays inside its planned arena, and answers a flash/RAM budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_CINC
from torch import nn

import export_c as ec
import export_ticket as et
from build_datasets import CLASSES, read_record, resample, synthetic_record
from model import HannunConfig, HannunNet

ROOT = Path(__file__).resolve().parents[1]
REAL_TICKET = ROOT / "results" / "cinc2017-cpu" / "seed3" / "lr_rewind" / "round_04"
"""A real-data ticket (width 0.25, 16x, lr_rewind) whose weights are committed in its
method folder's state.npz (run_state.py)."""

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler (apt-get install gcc)")


def _random_ticket(seed: int = 0) -> tuple[HannunNet, dict]:
    """A 16-block width-0.125 network, 8x randomly pruned, with BatchNorms that are not the
    identity and two dead inner channels (so shrinking has work to do)."""
    torch.manual_seed(seed)
    model = ec.random_ticket(0.125, 8.0, seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.blocks[2].conv2.weight[:, :2] = 0
    return model, {"mean": 5.0, "std": 200.0}


def _synthetic(n: int, seconds: float) -> list[np.ndarray]:
    out = []
    for i in range(n):
        x = synthetic_record(CLASSES[i % 4], np.random.default_rng([5, i]), seconds=(seconds * 0.6, seconds))
        out.append(x[: int(seconds * ec.FS)].astype(np.float32))
    return out


def _export(model: HannunNet, norm: dict, dtype: str, tmp: Path, seconds: float,
            calibration: list[np.ndarray] | None = None, extra: tuple[str, ...] = ()) -> tuple[ec.Program, Path]:
    p = ec.build_program(model, norm, seconds)
    if calibration is not None:
        ec.calibrate(p, calibration)
    folder = ec.write_c(p, dtype, tmp / dtype, "test")
    return p, ec.build(folder, extra)


def test_synthetic_fp32_and_int8_match_pytorch(tmp_path: Path) -> None:
    model, norm = _random_ticket()
    records = _synthetic(12, 10.24)
    for dtype in ("fp32", "int8"):
        p, exe = _export(model, norm, dtype, tmp_path, 10.24, records[:6] if dtype != "fp32" else None)
        assert p.tensors["b2.mid"][0] == model.blocks[2].conv1.out_channels - 2  # shrunk
        r = ec.compare(model, p, exe, records[6:])
        if dtype == "fp32":
            assert r["max_rel_diff"] <= 1e-4, r
        assert r["same_class"] >= 0.99, (dtype, r)


def _raw_records(names: list[str]) -> list[np.ndarray]:
    """CinC 2017 records read and resampled as build_datasets.py does, cut to 30 s."""
    return [resample(*read_record(SHARED_CINC, n))[:6144].astype(np.float32) for n in names]


def test_real_ticket_on_real_records(tmp_path: Path) -> None:
    """12 of the ticket's test records (30 s windows), calibrated on 16 records it was trained
    on, read from the raw CinC 2017 files (no built data set needed)."""
    if not (REAL_TICKET.parent / "state.npz").is_file():
        pytest.skip(f"{REAL_TICKET.parent}/state.npz absent")
    if not SHARED_CINC.is_dir():
        pytest.skip(f"real data absent ({SHARED_CINC})")
    model, norm = ec.read_ticket(REAL_TICKET)
    held = pd.read_csv(REAL_TICKET / "predictions.csv")  # the run's validation and test records
    test = _raw_records(list(held.loc[held["split"] == "test", "record"][:12]))
    trained_on = [p.stem for p in sorted(SHARED_CINC.glob("*.hea")) if p.stem not in set(held["record"])]
    calibration = _raw_records(trained_on[:16])
    for dtype in ("fp32", "int8"):
        p, exe = _export(model, norm, dtype, tmp_path, 30.0, calibration if dtype != "fp32" else None)
        r = ec.compare(model, p, exe, test)
        if dtype == "fp32":
            assert r["max_rel_diff"] <= 1e-4, r
        assert r["same_class"] >= 0.99, (dtype, r)


def test_streaming_c_equals_the_whole_record_after_the_delay(tmp_path: Path) -> None:
    """c/ecg_stream.c under AddressSanitizer/UBSan (so the planned rings are big enough):
    every step of records of any length equals the whole-record pass, and step t comes
    out with the push that completes sample 256 t + 255 + 9,953 (the look-ahead of stream.py)."""
    model, norm = _random_ticket(seed=2)
    rng = np.random.default_rng(3)
    records = [rng.normal(0, 200, n).astype(np.float32) for n in (12_800, 1000, 6000, 257)]
    for dtype in ("fp32", "int8"):
        p = ec.build_program(model, norm, 30)
        if dtype != "fp32":
            ec.calibrate(p, _synthetic(4, 30))
        folder = ec.write_c(p, dtype, tmp_path / dtype, "test", stream=True)
        exe = ec.build(folder, ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"), stream=True)
        r = ec.compare_stream(model, p, exe, records)
        if dtype == "fp32":
            assert r["max_rel_diff"] <= 1e-4, r
        assert r["same_class"] >= 0.99, (dtype, r)
        _, when = ec.run_c_stream(exe, records, p.classes)
        hop = ec.STREAM_HOP
        assert when == {t: (256 * t + 255 + 9953) // hop for t in range((12_800 - 9953) // 256)}
        cap = ec.ring_plan(p)[0]
        assert ec.ring_bytes(p, dtype, cap) < ec.costs(p, dtype)["arena_bytes"] / 2


def test_the_c_code_stays_in_its_arena_and_is_defined(tmp_path: Path) -> None:
    """AddressSanitizer and UBSan: any read or write past the planned arena (or signed
    overflow) aborts the program; the outputs are those of the plain build."""
    model, norm = _random_ticket(seed=1)
    records = _synthetic(3, 5.12)
    for dtype in ("fp32", "int8a8"):
        p, exe = _export(model, norm, dtype, tmp_path / "asan", 5.12, records if dtype != "fp32" else None,
                         ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g"))
        checked = ec.run_c(exe, records, p.samples // p.stride, p.classes)
        plain = ec.build(tmp_path / "asan" / dtype)
        assert all(np.array_equal(a, b) for a, b in zip(checked, ec.run_c(plain, records, p.samples // p.stride,
                                                                          p.classes), strict=True))


def test_buffer_plan_and_sizes() -> None:
    model, norm = _random_ticket()
    p = ec.build_program(model, norm, 5.12)
    for elem in (4, 2, 1):
        offsets, arena, bound = ec.plan_arena(p, elem)
        ec.check_plan(p, offsets, elem)
        assert bound <= arena <= 1.25 * bound
    with pytest.raises(ec.ExportCError, match="overlap"):  # the check can fail: stem output on the input
        ec.check_plan(p, {**offsets, "stem": offsets["input"]}, 1)
    # the first block: input, stem output, conv1 output and conv2 output; the stem's output
    # (the shortcut) lives until conv2, so three tensors of 4 channels x 1024 are alive
    c = model.cfg.start_filters
    assert ec.plan_arena(p, 4)[2] >= 3 * c * 1024 * 4
    weights = sum(int(torch.count_nonzero(w)) for n, w in model.named_parameters()
                  if n.endswith("weight") and w.dim() > 1)
    assert ec.macs(p) < weights * p.samples  # sparse: surviving weights x positions, less by the subsampling


def test_flash_count_matches_the_compiled_object(tmp_path: Path) -> None:
    model, norm = _random_ticket()
    p = ec.build_program(model, norm, 5.12)
    for dtype in ("fp32", "int8"):
        if dtype != "fp32":
            ec.calibrate(p, _synthetic(2, 5.12))
        sizes = ec.compiled_sizes(ec.write_c(p, dtype, tmp_path / dtype, "test"))
        counted = ec.flash_bytes(p, dtype)
        assert counted <= sizes["flash_bytes_compiled"] <= counted + 2048, (dtype, counted, sizes)
        assert sizes["bss_bytes_compiled"] >= ec.costs(p, dtype)["arena_bytes"]


def test_fit_budget_names_the_first_level_that_fits() -> None:
    levels = {c: ec.random_ticket(0.125, c, blocks=4) for c in (1.0, 2.0, 4.0, 8.0)}
    rows, _ = ec.fit_budget(levels, 1 << 30, 1 << 30, 2.56, "fp32")
    flash = {r["compression"]: r["flash_bytes"] for r in rows}
    assert flash[1.0] > flash[2.0] > flash[4.0] > flash[8.0]
    _, first = ec.fit_budget(levels, flash[4.0], 1 << 30, 2.56, "fp32")
    assert first == 4.0
    _, first = ec.fit_budget(levels, flash[8.0] - 1, 1 << 30, 2.56, "fp32")
    assert first is None
    rows, first = ec.fit_budget(levels, 1 << 30, 16, 2.56, "fp32")  # no arena fits 16 bytes
    assert first is None and rows[0]["longest_window_s_in_ram"] == 0
    model, norm = levels[1.0], {"mean": 0.0, "std": 1.0}
    ram = ec.costs(ec.build_program(model, norm, 3 * model.cfg.stride / ec.FS), "fp32")["arena_bytes"]
    assert ec.longest_window_steps(model, norm, ram, "fp32") == 3
    assert ec.longest_window_steps(model, norm, ram - 1, "fp32") == 2


def test_sizes_parse_and_bad_input_is_refused() -> None:
    assert ec.parse_bytes("256KB") == 256 * 1024 and ec.parse_bytes("1 MB") == 1 << 20
    assert ec.parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        ec.parse_bytes("lots")
    with pytest.raises(ec.ExportCError, match="power of 2"):
        ec.build_program(HannunNet(HannunConfig(width=0.125, blocks=2, kernel_size=6)).eval(),
                         {"mean": 0.0, "std": 1.0}, 1.0)
    with pytest.raises(ec.ExportCError, match="no .*model.pt"):
        ec.read_ticket(Path("/nonexistent/round_01"))
    assert et.TicketError  # the ticket loader's errors are export_ticket's


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model, norm = _random_ticket()
    ticket = tmp_path / "t.npz"
    et.save_ticket(et.ticket_arrays(model.cfg, model.state_dict(), None, norm, "fp32", "t"), ticket)
    report = ec.main(["--run", str(ticket), "--out", str(tmp_path / "c"), "--dtypes", "fp32", "--seconds", "2.56"])
    row = report["fp32"]
    assert row["window_samples"] == 512 and (tmp_path / "c" / "fp32" / "ecg_main").is_file()
    assert row["flash_bytes"] <= row["flash_bytes_compiled"] and row["macs_per_second_of_ecg"] > 0
    assert (tmp_path / "c" / "report.json").is_file()
    report = ec.main(["--fit", "--width", "0.125", "--levels", "1,4", "--flash", "1MB", "--ram", "1MB",
                      "--dtypes", "int8", "--seconds", "2.56"])
    assert report["int8"]["first_fit"] == 1.0 and "first level that fits: 1.0" in capsys.readouterr().out
    for argv, message in ((["--run", str(ticket), "--out", str(tmp_path / "d")], "int8 needs --data"),
                          (["--run", str(ticket), "--out", str(tmp_path / "d"), "--dtypes", "fp32", "--check", "3"],
                           "--check compares"),
                          (["--fit", "--flash", "lots"], "not a size")):
        with pytest.raises(SystemExit):
            ec.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no model.pt"):
        ec.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "e"), "--dtypes", "fp32"])

"""Streaming inference (stream.py) equals the whole-record pass, after the stated delay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import export_ticket as et
import stream
from model import HannunConfig, HannunNet
from stream import HOP, Streamer, lookahead_samples


def _net(blocks: int, width: float = 0.125, seed: int = 0) -> HannunNet:
    """A random network whose BatchNorms are not the identity (so a misplaced column shows)."""
    torch.manual_seed(seed)
    model = HannunNet(HannunConfig(width=width, blocks=blocks)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _stream(model: HannunNet, x: torch.Tensor, hop: int) -> tuple[torch.Tensor, list[int], Streamer]:
    s = Streamer(model)
    outs, counts = [], []
    for i in range(0, x.shape[-1], hop):
        outs.append(s.push(x[i:i + hop]))
        counts.append(outs[-1].shape[0])
    outs.append(s.flush())
    return torch.cat(outs), counts, s


def test_published_depth_streams_one_step_per_hop_after_the_delay() -> None:
    model = _net(blocks=16)
    assert model.cfg.stride == HOP and lookahead_samples(model) == 9953  # 8 + 39 x (1 + 2 + ... + 128)
    steps = 50
    x = torch.randn(steps * HOP, generator=torch.Generator().manual_seed(1))
    got, counts, s = _stream(model, x, HOP)
    with torch.no_grad():
        want = model(x.view(1, 1, -1))[0]
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    # step t is emitted by hop t + delay (hop h holds samples 256h..256h+255), one per hop
    assert s.delay_steps == 39
    assert counts == [0] * 39 + [1] * (steps - 39)


@pytest.mark.parametrize("blocks", [1, 4, 5])
def test_each_step_appears_exactly_when_its_lookahead_arrives(blocks: int) -> None:
    """Sample by sample: step t comes out with sample stride*t + stride - 1 + lookahead."""
    model = _net(blocks=blocks)
    stride, ahead = model.cfg.stride, lookahead_samples(model)
    steps = -(-ahead // stride) + 10  # 10 steps come out before the end
    x = torch.randn(steps * stride, generator=torch.Generator().manual_seed(2))
    s = Streamer(model)
    seen: list[int] = []
    outs = []
    for i in range(len(x)):
        o = s.push(x[i:i + 1])
        seen += [i] * o.shape[0]
        outs.append(o)
    outs.append(s.flush())
    done = [t for t in range(steps) if stride * t + stride - 1 + ahead < len(x)]
    assert len(done) == 10 and seen == [stride * t + stride - 1 + ahead for t in done]
    with torch.no_grad():
        want = model(x.view(1, 1, -1))[0]
    assert torch.allclose(torch.cat(outs), want, rtol=1e-4, atol=1e-5)


def test_state_is_bounded() -> None:
    model = _net(blocks=8)
    s = Streamer(model)
    x = torch.randn(HOP * 40, generator=torch.Generator().manual_seed(3))
    sizes = []
    for i in range(0, len(x), HOP):
        s.push(x[i:i + HOP])
        sizes.append(s.state_floats())
    assert max(sizes[10:]) == min(sizes[10:]) > 0  # steady state: the same columns every hop


def test_a_shrunk_ticket_streams_too() -> None:
    model = _net(blocks=4, width=0.25)
    with torch.no_grad():
        model.blocks[1].conv2.weight[:, :3] = 0  # 3 dead inner channels
    shrunk = et.shrink(model)
    assert shrunk.blocks[1].conv1.out_channels == model.blocks[1].conv1.out_channels - 3
    x = torch.randn(HOP * 6, generator=torch.Generator().manual_seed(4))
    got, _, _ = _stream(shrunk, x, 100)  # any hop size works
    with torch.no_grad():
        want = model(x.view(1, 1, -1))[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        Streamer(HannunNet(HannunConfig(width=0.125, blocks=2)))


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert stream.main(["--bench", "--widths", "0.125", "--blocks", "2", "--seconds", "0.01"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["lookahead_samples"] == 47 and row["ms_per_hop_1_thread"] > 0  # 8 + 39
    model = _net(blocks=4)
    ticket = tmp_path / "t.npz"
    et.save_ticket(et.ticket_arrays(model.cfg, model.state_dict(), None, {"mean": 0.0, "std": 100.0}, "fp32", "t"),
                   ticket)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ok.npy", rng.normal(0, 100, 1000))
    np.save(tmp_path / "bad.npy", np.full(1000, np.nan))
    assert stream.main(["--ticket", str(ticket), str(tmp_path / "ok.npy")]) == 0
    out = capsys.readouterr().out
    assert "delay 125 samples" in out and len(out.splitlines()[1].split()) == 1000 // 4
    assert stream.main(["--ticket", str(ticket), str(tmp_path / "bad.npy")]) == 1
    assert "NaN" in capsys.readouterr().err

"""compare_variants.py: variants of a grid (one-shot, other allocations) paired with the
reference grid level by level, on tiny hand-made experiments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_summary import CLASSES, _noisy, _run

import compare_variants as cv


def _experiment(exp: Path, levels: dict[float, dict[int, np.ndarray]], labels: np.ndarray) -> None:
    """An experiment folder with weight_rewind rounds at ``levels`` ({ratio: {seed:
    predictions}}), each with its predictions.csv and a sparsity.csv of two layers."""
    rows = []
    for r, (ratio, by_seed) in enumerate(sorted(levels.items()), start=1):
        for seed, predicted in by_seed.items():
            folder = f"seed{seed}/weight_rewind/round_{r:02d}"
            rows.append(_run(exp, folder, labels, predicted, method="weight_rewind", seed=seed, round=r,
                             compression=ratio, accepted=True, remaining=1000 / ratio, test_accuracy=0.9,
                             val_accuracy=0.9, test_sensitivity_A=0.5, test_ppv_A=0.6))
            pd.DataFrame({"layer": ["stem", "head"], "weights": [100, 900],
                          "sparsity": [0.5, 1 - 1 / ratio]}).to_csv(exp / folder / "sparsity.csv", index=False)
    pd.DataFrame(rows).to_csv(exp / "results.csv", index=False)


@pytest.fixture
def grids(tmp_path: Path) -> dict[str, Path]:
    """A reference grid at 4x and 16x (2 seeds); 'same': its 16x predictions exactly;
    'worse': much noisier at 16x; 'oneshot': one folder per level, the reference's
    predictions at 4x and 16x; 'seed1': at 16x, seed 1 (noisier) and seed 5, which the
    reference lacks."""
    rng = np.random.default_rng(2)
    labels = rng.choice(list(CLASSES), 200, p=[0.5, 0.2, 0.2, 0.1])
    ref = {ratio: {s: _noisy(labels, 0.1, rng) for s in (0, 1)} for ratio in (4.0, 16.0)}
    paths = {name: tmp_path / name for name in ("ref", "same", "worse", "one4", "one16", "seed1")}
    _experiment(paths["ref"], ref, labels)
    _experiment(paths["same"], {16.0: ref[16.0]}, labels)
    _experiment(paths["worse"], {16.0: {s: _noisy(labels, 0.7, rng) for s in (0, 1)}}, labels)
    _experiment(paths["one4"], {4.0: ref[4.0]}, labels)
    _experiment(paths["one16"], {16.0: ref[16.0]}, labels)
    _experiment(paths["seed1"], {16.0: {1: _noisy(labels, 0.3, rng), 5: _noisy(labels, 0.5, rng)}}, labels)
    return paths


def _section(text: str, level: str) -> dict[str, list[str]]:
    block = text.split(f"### {level}\n")[1].split("###")[0]
    return {cells[0]: cells for line in block.splitlines()[3:] if line.startswith("|")
            for cells in [[c.strip() for c in line.split("|")[1:-1]]]}


def test_variants_are_paired_with_the_reference_level_by_level(grids: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cv.main(["--reference", str(grids["ref"]), "--variant", f"same={grids['same']}",
             "--variant", f"worse={grids['worse']}", "--variant", f"oneshot={grids['one4']},{grids['one16']}",
             "--levels", "4,16", "--out", str(out)])
    text = (out / "comparison.md").read_text()
    at16, at4 = _section(text, "16x"), _section(text, "4x")
    assert at16["same"][4] == "+0.000 (+0.000 to +0.000; t, 1 df +0.000 to +0.000), seeds +0.000..+0.000"
    assert at16["oneshot"][4].startswith("+0.000 (+0.000 to +0.000;")  # found in its second folder
    high = float(at16["worse"][4].split(" to ")[1].split(";")[0])
    assert high < 0
    assert at4["oneshot"][4].startswith("+0.000 (+0.000 to +0.000;")
    assert at4["worse"][1] == "not reached" and at4["same"][1] == "not reached"
    assert at16["reference"][6] == "0.50 / 0.60"  # AF sensitivity / PPV
    assert (out / "layers.png").is_file()
    assert "**Exploratory**" not in text
    (grids["worse"] / "exploratory.json").write_text('{"seeds": [0, 1], "why": "chosen after the test"}')
    cv.main(["--reference", str(grids["ref"]), "--variant", f"worse={grids['worse']}", "--levels", "16",
             "--out", str(out)])
    assert f"**Exploratory** (results chosen after test figures were seen): {grids['worse']}, seeds 0, 1 " \
           "(chosen after the test)." in (out / "comparison.md").read_text()


def test_a_variant_on_fewer_seeds_shows_the_reference_over_the_shared_seeds(grids: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cv.main(["--reference", str(grids["ref"]), "--variant", f"same={grids['same']}",
             "--variant", f"seed1={grids['seed1']}", "--levels", "16", "--out", str(out)])
    at16 = _section((out / "comparison.md").read_text(), "16x")
    ref = pd.read_csv(grids["ref"] / "results.csv").query("compression == 16.0").set_index("seed")
    f1 = ref["test_challenge_f1"]
    assert f1[0] != pytest.approx(f1[1])
    assert at16["reference"][2].startswith(f"{f1.mean():.3f} ± ") and at16["reference"][3] == ""
    assert at16["same"][3] == f"{f1.mean():.3f} (n=2)"
    assert at16["seed1"][3] == f"{f1[1]:.3f} (n=1)"  # seed 5 has nothing to pair with
    mine = pd.read_csv(grids["seed1"] / "results.csv").set_index("seed")["test_challenge_f1"]
    assert at16["seed1"][2].startswith(f"{mine.mean():.3f} ± ")
    assert float(at16["seed1"][4].split()[0]) == pytest.approx(mine[1] - f1[1], abs=0.0005)


def test_layers_panel_has_one_bar_per_variant_found(grids: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    figures = []
    monkeypatch.setattr(cv.plt, "close", figures.append)
    ref = cv.variant_rows([grids["ref"]], "weight_rewind")
    variants = {"same": cv.variant_rows([grids["same"]], "weight_rewind")}
    cv.plot_layers(ref, variants, [4.0, 16.0], 0, grids["ref"])
    at4, at16 = figures[0].axes
    assert len(at4.containers) == 1 and len(at16.containers) == 2  # 'same' has no 4x round
    heights = [bar.get_height() for bar in at16.containers[1]]
    assert heights == pytest.approx([0.5, 1 / 16])  # 1 - sparsity of stem and head


def test_bad_flags_name_the_culprit(grids: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--reference", str(grids["ref"]), "--out", str(tmp_path / "o")]
    for extra, says in ((["--variant", "noequals"], "NAME=EXP"),
                        (["--variant", f"reference={grids['same']}"], "not 'reference'"),
                        (["--variant", f"a={grids['same']}", "--levels", "1,x"], "comma-separated numbers"),
                        (["--variant", f"a={grids['same']}", "--levels", "0.5"], "above 1")):
        with pytest.raises(SystemExit):
            cv.main(base + extra)
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no finished late_reset round"):
        cv.main(base + ["--variant", f"a={grids['same']}", "--method", "late_reset"])

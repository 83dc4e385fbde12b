"""Scaling-law check: Spearman's rho and monotonicity breaks on synthetic numbers, and one real
ladder of two locally built models of different sizes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from corefbot.models.train.evaluate import Stat
from corefbot.models.train.scaling import (ScalingRow, monotonicity_breaks, ranks, spearman, verdicts_for)


def test_ranks_share_ties() -> None:
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert ranks([]) == []


def test_spearman_matches_the_textbook_formula() -> None:
    x = [1, 2, 3, 4, 5, 6]
    y = [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]
    d2 = sum((a - b) ** 2 for a, b in zip(ranks(x), ranks(y)))
    n = len(x)
    assert spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    assert spearman(x, [v * 3 for v in x]) == pytest.approx(1.0)
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    # Monotone but non-linear is still perfect rank correlation.
    assert spearman([1e6, 1e7, 1e8, 1e9], [0.1, 0.11, 0.5, 0.51]) == pytest.approx(1.0)
    # With ties: Pearson on average ranks (hand-computed: ranks y = 1, 2.5, 2.5, 4).
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(5 * 4.5))
    assert math.isnan(spearman([1, 2, 3], [7, 7, 7]))
    assert math.isnan(spearman([1], [1]))
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1])


def test_monotonicity_breaks_and_verdicts() -> None:
    names = ["7B", "0.5B", "4B", "1.8B"]
    sizes = [7_000, 500, 4_000, 1_800]  # any input order: steps are taken by size
    values = [0.80, 0.60, 0.55, 0.70]  # by size: 0.60, 0.70, 0.55, 0.80
    breaks = monotonicity_breaks(names, sizes, values, spreads=[0.01, 0.01, 0.2, 0.01])
    assert [(b.smaller, b.larger) for b in breaks] == [("1.8B", "4B")]
    assert breaks[0].drop == pytest.approx(0.15) and breaks[0].within_noise  # 4B's spread is 0.2

    def row(name: str, size: int, p: float, std: float = 0.0) -> ScalingRow:
        s = Stat(p, std, p, p)
        return ScalingRow(name, name, "base", size, {"precision": s, "recall": s, "f1": s})

    rising = verdicts_for([row("a", 1, 0.5), row("b", 2, 0.6), row("c", 3, 0.7)], "precision")[0]
    assert rising.consistent is True and rising.spearman == pytest.approx(1.0) and not rising.breaks
    assert "consistent with the scaling law" in rising.text()
    falling = verdicts_for([row("a", 1, 0.5), row("b", 2, 0.7), row("c", 3, 0.4)], "precision")[0]
    assert falling.consistent is False and [(b.smaller, b.larger) for b in falling.breaks] == [("b", "c")]
    assert "NOT consistent" in falling.text() and "b → c" in falling.text()
    lone = verdicts_for([row("a", 1, 0.5)], "precision")[0]
    assert lone.consistent is None and "at least two" in lone.text()


@pytest.mark.slow
def test_real_two_model_ladder(tiny_hf: Path, tmp_path: Path) -> None:
    from corefbot.models.train.evaluate import load_model, parameter_count
    from corefbot.models.train.scaling import count_parameters, format_table, plot, scaling_check
    from corefbot.models.train.tiny import make_model
    from tests.test_finetune import chat_examples

    small = make_model("small", tmp_path / "small")
    examples = chat_examples(8)
    report = scaling_check([small, tiny_hf], examples, progress=False)
    assert [r.path for r in report.rows] == [str(tiny_hf), str(small)]  # ordered by size
    model, _ = load_model(tiny_hf)
    assert report.rows[0].parameters == count_parameters(tiny_hf) == parameter_count(model)
    assert report.rows[1].parameters > 5 * report.rows[0].parameters
    verdict = report.verdicts[0]
    values = [r.stats["precision"].mean for r in report.rows]
    assert verdict.models == 2 and len(verdict.breaks) == (1 if values[1] < values[0] else 0)
    assert verdict.spearman in (-1.0, 1.0) or math.isnan(verdict.spearman)
    table = format_table(report)
    assert "tiny_hf" in table or str(tiny_hf.name) in table
    assert plot(report, tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows"][0]["precision"]["mean"] == pytest.approx(values[0])


def test_a_gguf_counts_the_parameters_of_the_model_it_holds(tiny_hf, tiny_gguf) -> None:
    from corefbot.models.train.scaling import count_parameters

    assert count_parameters(tiny_gguf) == count_parameters(tiny_hf) > 0

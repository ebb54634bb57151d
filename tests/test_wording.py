"""What the tool prints reads right: counts agree with their nouns, everywhere."""

import re
from pathlib import Path

from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.errors import counted, listed

SOURCE = Path(__file__).resolve().parents[1] / "src" / "targan_cli"


def test_counted_agrees_in_number() -> None:
    assert counted(1, "slice") == "1 slice"
    assert counted(2, "slice") == "2 slices"
    assert counted(0, "slice") == "0 slices"
    assert counted(1, "series", "series") == "1 series" and counted(3, "series", "series") == "3 series"
    assert counted(1000, "step") == "1,000 steps" and counted(25000, "step") == "25,000 steps"


def test_listed_reads_as_a_sentence() -> None:
    assert listed([]) == "none"
    assert listed(["a"]) == "a"
    assert listed(["a", "b"]) == "a and b"
    assert listed(["a", "b", "c"]) == "a, b and c"


def test_no_message_hedges_a_count_with_an_s_in_brackets() -> None:
    """`{n} case(s)` in any message: counts go through ``counted`` instead."""
    hedged = re.compile(r"\} (\w+ )?\w+\(s\)")  # a count, at most one word, then the hedged noun
    found = [f"{path.relative_to(SOURCE)}:{number}: {line.strip()}"
             for path in sorted(SOURCE.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if hedged.search(line)]
    assert not found, found


def test_one_paired_case_is_singular(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "phantom", str(tmp_path / "data"), "--cases", "1", "--test-cases", "1",
                                      "--size", "16", "--slices", "4"])
    assert result.exit_code == 0, result.output
    assert "1 paired test case\n" in result.stdout.replace(" \n", "\n")
    assert "(s)" not in result.stdout

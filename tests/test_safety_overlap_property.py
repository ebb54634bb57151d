"""The overlap rule over random (input, output) path pairs built from names, ``.``, ``..``,
symbolic links (to folders, to files, to an ancestor, dangling) and nesting.

The oracle does not resolve paths: it creates the output in the real tree and looks for it (and
for the input) by walking the folders with ``os.walk`` and comparing ``stat`` results, which is
what the file system itself says about where an entry lies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from targan_cli.errors import TarganError
from targan_cli.io.atomic import check_apart

NAMES = ["a", "b", "c", "f", "g", "la", "lb", "lf", "loop", "dangling", "new", "..", "."]


def _tree(root: Path) -> Path:
    """sandbox/{a/{f, b/{g}}, c/, la -> a, lb -> a/b, lf -> a/f, loop -> ., dangling -> nowhere}."""
    sandbox = root / "sandbox"
    (sandbox / "a" / "b").mkdir(parents=True)
    (sandbox / "c").mkdir()
    (sandbox / "a" / "f").write_text("f")
    (sandbox / "a" / "b" / "g").write_text("g")
    (sandbox / "la").symlink_to("a")
    (sandbox / "lb").symlink_to(Path("a") / "b")
    (sandbox / "lf").symlink_to(Path("a") / "f")
    (sandbox / "a" / "b" / "up").symlink_to("..")  # a link to an ancestor inside the tree
    (sandbox / "loop").symlink_to(".")
    (sandbox / "dangling").symlink_to("nowhere")
    return sandbox


def _entries_under(top: Path) -> list[os.stat_result]:
    """lstat of ``top`` (followed, if a link: what is read) and of every entry below it, links not followed."""
    found = [os.stat(top)]
    if os.path.islink(top) and not os.path.isdir(top):
        return found
    for folder, folders, files in os.walk(top, followlinks=False):
        found += [os.lstat(os.path.join(folder, name)) for name in [*folders, *files]]
    return found


def _contains(entries: list[os.stat_result], wanted: os.stat_result) -> bool:
    return any(os.path.samestat(entry, wanted) for entry in entries)


def _overlap_oracle(sandbox: Path, input: Path, output: Path) -> bool:
    """Create ``output`` (a file, with its folders) if absent, then ask the file system."""
    if not os.path.lexists(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
        output.write_text("output")
    if os.path.exists(output) and os.path.samestat(os.stat(output), os.stat(input)):
        return True  # the same file (also through a link)
    if _contains(_entries_under(input), os.lstat(output)):
        return True  # the entry written lies inside the input
    if os.path.isdir(output) and not os.path.islink(output):
        return _contains(_entries_under(output)[1:], os.stat(input))  # the input lies inside the output
    return False


def _escapes(sandbox: Path, path: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real != sandbox.resolve() and sandbox.resolve() not in real.parents


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(input_parts=paths, output_parts=paths)
def test_the_overlap_rule_refuses_exactly_the_overlapping_pairs(input_parts: list[str], output_parts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        sandbox = _tree(Path(root))
        input = sandbox.joinpath(*input_parts)
        output = sandbox.joinpath(*output_parts)
        assume(os.path.exists(input) and not _escapes(sandbox, input) and not _escapes(sandbox, output))
        try:
            check_apart(output, [input])
            refused = False
        except TarganError:
            refused = True
        try:
            expected = _overlap_oracle(sandbox, input, output)
        except OSError:  # the output cannot be created there (a file or a dangling link on the way)
            assume(False)
        assert refused == expected, (input, output)


def test_the_oracle_sees_overlaps_through_links_and_dots(tmp_path: Path) -> None:
    """The oracle itself, on pairs whose answer is known by construction."""
    sandbox = _tree(tmp_path)
    assert _overlap_oracle(sandbox, sandbox / "a", sandbox / "la" / "new")
    assert _overlap_oracle(sandbox, sandbox / "lb" / "g", sandbox / "c" / ".." / "a")
    assert not _overlap_oracle(sandbox, sandbox / "a" / "b" / "g", sandbox / "lb")  # replacing the link spares g
    assert _overlap_oracle(sandbox, sandbox / "lf", sandbox / "a" / "f")
    assert not _overlap_oracle(sandbox, sandbox / "a" / "b", sandbox / "c" / "new")
    assert not _overlap_oracle(sandbox, sandbox / "a" / "f", sandbox / "a" / "b" / "new")


@pytest.mark.parametrize("output, input", [("la/new", "a"), ("a", "lb/g"), ("lb/up/f", "a/f"), ("c/../a/b", "la"),
                                            ("b/../lf", "lf")])
def test_overlaps_through_links_and_dots_are_refused(tmp_path: Path, output: str, input: str) -> None:
    sandbox = _tree(tmp_path)
    with pytest.raises(TarganError):
        check_apart(sandbox / output, [sandbox / input])

"""load() and the CLI on damaged runs: what can be read is read, what is skipped is counted, and a run
that cannot be read at all is one documented error (issue 14, Must 4)."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest

from cockpit_lite import load
from cockpit_lite.cli import main
from cockpit_lite.errors import CockpitWarning
from cockpit_lite.io import FIRST_LINES, RunReadError
from tests.sinks_util import train

# lines no reader may take for a record: each one is damage, counted once
JUNK = [
    b"\x00\x9f\xff\xfe garbage \x01\x02",
    b"[1, 2, 3]",
    b'"a string"',
    b"42",
    b"null",
    b'{"records": {"loss": 1.0}}',
    b'{"step": 3}',
    b'{"step": 3, "records": [1.0]}',
    b'{"step": 3, "records": "loss"}',
    b'{"step": "3", "records": {"loss": 1.0}}',
    b'{"step": 3.0, "records": {"loss": 1.0}}',
    b'{"step": true, "records": {"loss": 1.0}}',
    b'{"step": 1' + b"0" * 30 + b', "records": {"loss": 1.0}}',
    b'{"step": 1' + b"0" * 5000 + b', "records": {"loss": 1.0}}',
    b'{"step": 1e400, "records": {"loss": 1.0}}',
    b'{"step": 2, "records": {"loss": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
    b'{"step": 2, "records": {"loss": ' + b"[" * 5_000 + b"]" * 5_000 + b"}}",
    b'{"step": 2, "records": {"los\xc3\x28": 1.0}}',
    b'{"step": 2, "records": {"loss": [[1.0, 2.0], [3.0]]}}',
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    train(6, logdir=d, sinks=[])
    return (d / "cockpit.jsonl").read_bytes().splitlines(keepends=True)


def _damage_line(line: bytes, rng: random.Random) -> bytes:
    body = line.rstrip(b"\n")
    kind = rng.choice(["ff", "quote", "cut"])
    if kind == "quote" and b"\\" not in body:
        # one more unescaped quote: an odd number of them is never valid JSON
        i = rng.choice([i for i, c in enumerate(body) if c != ord('"')])
        return body[:i] + b'"' + body[i + 1 :] + b"\n"
    if kind == "cut":
        return body[: rng.randrange(1, len(body))] + b"\n"  # a JSON object ends with its '}'
    i = rng.randrange(len(body))
    return body[:i] + b"\xff" + body[i + 1 :] + b"\n"  # 0xff is never UTF-8


def _fuzz(lines: list[bytes], seed: int) -> tuple[bytes, list[int], list[bytes]]:
    """A damaged copy of the run: its bytes, the (1-based) numbers of its damaged lines, and the intact
    original lines it holds."""
    rng = random.Random(seed)
    out: list[tuple[bytes, bool]] = []
    for line in lines:
        if rng.random() < 0.15:
            out.append((rng.choice(JUNK) + b"\n", True))
        if rng.random() < 0.25:
            out.append((_damage_line(line, rng), True))
        else:
            out.append((line, False))
    if rng.random() < 0.5:  # a crash cut the file: the last line is cut short
        body = out[-1][0]
        out[-1] = (body[: rng.randrange(1, len(body) - 1)], True)
    data = b"".join(b for b, _ in out)
    bad = [i + 1 for i, (_, damaged) in enumerate(out) if damaged]
    return data, bad, [b for b, damaged in out if not damaged]


def _reference(lines: list[bytes]) -> dict[str, dict[int, object]]:
    """tag -> step -> value of intact lines, the later line winning."""
    ref: dict[str, dict[int, object]] = {}
    for line in lines:
        entry = json.loads(line)
        for tag, v in entry["records"].items():
            ref.setdefault(tag, {})[entry["step"]] = v
    return ref


def _same(loaded: object, raw: object) -> bool:
    if isinstance(raw, str) and raw in ("nan", "inf", "-inf"):
        return isinstance(loaded, float) and (math.isnan(loaded) if raw == "nan" else loaded == float(raw))
    if isinstance(raw, list):
        return isinstance(loaded, np.ndarray) and all(_same(a, b) for a, b in zip(loaded.tolist(), raw, strict=True))
    if isinstance(raw, dict):
        return isinstance(loaded, dict) and loaded.keys() == raw.keys() and all(_same(loaded[k], raw[k]) for k in raw)
    return loaded == raw


@pytest.mark.parametrize("seed", range(40))
def test_fuzzed_run_reads_the_intact_lines_and_counts_the_rest(run, seed, tmp_path, capsys):
    data, bad, intact = _fuzz(run, seed)
    (tmp_path / "cockpit.jsonl").write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = load(tmp_path)
    assert h.skipped == len(bad)
    assert h.skipped_lines == bad[:FIRST_LINES]
    said = [w for w in caught if issubclass(w.category, CockpitWarning)]
    assert len(said) == (1 if bad else 0) and len(caught) == len(said)
    if bad:
        assert f"skipped {len(bad)} damaged line" in str(said[0].message) and str(bad[0]) in str(said[0].message)
    ref = _reference(intact)
    assert set(h) == set(ref)
    for tag, by_step in ref.items():
        assert [s for s, _ in h[tag]] == sorted(by_step)
        assert all(_same(v, by_step[s]) for s, v in h[tag])
    if seed % 8 == 0:  # the CLI says the same, with no traceback
        assert main(["summary", str(tmp_path)]) == 0
        err = capsys.readouterr().err
        assert (f"skipped {len(bad)} damaged line" in err) == bool(bad) and "Traceback" not in err


def test_cli_dashboard_of_a_damaged_run(run, tmp_path, capsys):
    data, bad, _ = _fuzz(run, 3)
    assert bad
    (tmp_path / "cockpit.jsonl").write_bytes(data)
    assert main(["dashboard", str(tmp_path), "-o", str(tmp_path / "d.png")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {len(bad)} damaged line" in err and (tmp_path / "d.png").stat().st_size > 10_000


def test_only_junk_is_an_empty_history_with_every_line_counted(tmp_path):
    (tmp_path / "cockpit.jsonl").write_bytes(b"\n".join(JUNK) + b"\n\n")  # the blank line is no damage
    with pytest.warns(CockpitWarning, match=f"skipped {len(JUNK)} damaged lines"):
        h = load(tmp_path)
    assert len(h) == 0 and h.skipped == len(JUNK) and h.skipped_lines == list(range(1, FIRST_LINES + 1))


def _one_line_error(args: list[str], capsys) -> str:
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    return captured.err


def test_wrong_path(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no cockpit run in"):
        load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no cockpit run in"):
        load(tmp_path)  # an empty directory
    for cmd in ("summary", "dashboard"):
        assert "no cockpit run in" in _one_line_error([cmd, str(tmp_path / "nowhere")], capsys)


def test_directory_named_like_the_file(tmp_path, capsys):
    (tmp_path / "cockpit.jsonl").mkdir()
    with pytest.raises(RunReadError, match="is a directory") as e:
        load(tmp_path)
    assert isinstance(e.value, ValueError) and str(tmp_path / "cockpit.jsonl") in str(e.value)
    for cmd in ("summary", "dashboard"):
        assert "is a directory" in _one_line_error([cmd, str(tmp_path)], capsys)


def test_unreadable_file(run, tmp_path, capsys, monkeypatch):
    (tmp_path / "cockpit.jsonl").write_bytes(b"".join(run))

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("cockpit_lite.io.open", refuse, raising=False)
    with pytest.raises(RunReadError, match="Permission denied.*chmod"):
        load(tmp_path)
    assert "Permission denied" in _one_line_error(["summary", str(tmp_path)], capsys)


def test_a_file_path_is_read_too(run, tmp_path):
    (tmp_path / "cockpit.jsonl").write_bytes(b"".join(run))
    direct, via_dir = load(tmp_path / "cockpit.jsonl"), load(tmp_path)
    assert set(direct) == set(via_dir) and direct["loss"] == via_dir["loss"]


def _write(path, rows):
    path.write_text("".join(json.dumps({"step": s, "records": r}) + "\n" for s, r in rows))


def test_select_tags_and_steps(tmp_path):
    rows = [(s, {"loss": s * 0.5, "grad_norm": s + 1.0, "grad_norm/fc1": -s * 1.0, "lr": 0.1}) for s in range(50)]
    rows.append((10, {"loss": 99.0}))  # written again later: the later value wins, selected or not
    _write(tmp_path / "cockpit.jsonl", rows)
    h = load(tmp_path, tags=["loss"], steps=(5, 12))
    assert list(h) == ["loss"]
    assert h["loss"] == [(s, 99.0 if s == 10 else s * 0.5) for s in range(5, 12)]
    h = load(tmp_path, tags="grad_norm")
    assert sorted(h) == ["grad_norm", "grad_norm/fc1"] and h["grad_norm/fc1"][-1] == (49, -49.0)
    h = load(tmp_path, steps=(45, None))
    assert sorted(h) == ["grad_norm", "grad_norm/fc1", "loss", "lr"] and h.steps("lr").tolist() == [45, 46, 47, 48, 49]
    h = load(tmp_path, steps=(None, 2), tags=["lr", "absent"])
    assert list(h) == ["lr"] and h["lr"] == [(0, 0.1), (1, 0.1)]
    assert len(load(tmp_path, tags=[])) == 0 and len(load(tmp_path, steps=(60, 70))) == 0


def test_selected_steps_skip_damage_outside_them_unparsed(tmp_path):
    rows = [(s, {"loss": float(s)}) for s in range(20)]
    _write(tmp_path / "cockpit.jsonl", rows)
    lines = (tmp_path / "cockpit.jsonl").read_bytes().splitlines(keepends=True)
    lines[3] = lines[3][:-5] + b"\xff\n"  # step 3: damaged after its step prefix
    lines[15] = b"junk\n"  # no step prefix: parsed, so counted
    (tmp_path / "cockpit.jsonl").write_bytes(b"".join(lines))
    with pytest.warns(CockpitWarning, match="line 16"):
        h = load(tmp_path, steps=(10, 20))
    assert h.skipped == 1 and h.skipped_lines == [16]
    assert h.steps("loss").tolist() == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    with pytest.warns(CockpitWarning, match="skipped 2 damaged lines"):
        h = load(tmp_path)
    assert h.skipped_lines == [4, 16]


def test_folder_of_runs_counts_per_run(run, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "cockpit.jsonl").write_bytes(b"".join(run))
    (tmp_path / "b" / "cockpit.jsonl").write_bytes(b"".join(run) + b"[1]\n")
    with pytest.warns(CockpitWarning, match="skipped 1 damaged line "):
        runs = load(tmp_path, tags=["loss"])
    assert runs["a"].skipped == 0 and runs["b"].skipped == 1 and runs["a"]["loss"] == runs["b"]["loss"]

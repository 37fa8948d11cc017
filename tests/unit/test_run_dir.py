"""The run directory's round log: resume truncation and rounds written twice."""

import json

from fedumm.server.run_dir import RunDir


def _write(run: RunDir, rounds: list[tuple[int, float]]) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"round": r, "global": {"vqa_accuracy": a}}) for r, a in rounds]
    run.metrics.write_text("\n".join(lines) + "\n")


def _seen(run: RunDir) -> list[tuple[int, float]]:
    return [(r["round"], r["global"]["vqa_accuracy"]) for r in run.read_rounds()]


def test_a_round_written_twice_is_read_once_with_its_later_line(tmp_path):
    run = RunDir(tmp_path / "run")
    _write(run, [(1, 10.0), (2, 20.0), (1, 11.0), (2, 21.0), (3, 31.0)])
    assert _seen(run) == [(1, 11.0), (2, 21.0), (3, 31.0)]


def test_truncation_for_a_resume_keeps_one_line_per_round_up_to_the_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    _write(run, [(1, 10.0), (2, 20.0), (3, 30.0), (1, 11.0), (2, 21.0)])
    run.truncate_rounds(2)
    assert run.metrics.read_text().count("\n") == 2
    assert _seen(run) == [(1, 11.0), (2, 21.0)]


def test_a_torn_last_line_leaves_the_rounds_before_it(tmp_path):
    run = RunDir(tmp_path / "run")
    _write(run, [(1, 10.0), (2, 20.0)])
    with open(run.metrics, "a") as f:
        f.write('{"round": 3, "glo')
    assert _seen(run) == [(1, 10.0), (2, 20.0)]

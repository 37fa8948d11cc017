"""Per-client accuracy on each client's own answer distribution, and the worst-client summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedumm.data.vqa import VQASample
from fedumm.errors import DataError
from fedumm.eval.clients import client_accuracies
from fedumm.summary import ClientAccuracy, SettingResult, worst_client_summary


def _q(qid: int, answer: str) -> VQASample:
    return VQASample(
        question_id=qid,
        image_id=qid,
        image_path=Path(f"{qid}.png"),
        question="what?",
        answers=(answer,) * 10,
        multiple_choice_answer=answer,
        answer_type="other",
        question_type="what",
    )


TEST = [_q(1, "red"), _q(2, "red"), _q(3, "blue"), _q(4, "cat")]
PREDS = {1: "red", 2: "green", 3: "blue", 4: "dog"}  # acc(red) = 0.5, acc(blue) = 1, acc(cat) = 0


def test_each_client_is_scored_on_its_own_answers_by_hand():
    got = client_accuracies(
        PREDS,
        TEST,
        {"a": ["red", "blue"], "b": ["cat"] * 3, "d": ["red", "dog"], "e": ["dog"], "f": []},
    )
    assert got == {
        "a": ClientAccuracy(accuracy=75.0, coverage=1.0),  # (0.5 + 1) / 2
        "b": ClientAccuracy(accuracy=0.0, coverage=1.0),
        "d": ClientAccuracy(accuracy=50.0, coverage=0.5),  # "dog" is not in the test split
    }  # e: none of its answers in the test split; f: no VQA examples
    summary = worst_client_summary(got)
    # p10 of [0, 50, 75]: position 0.2 between 0 and 50
    assert summary == {"mean": 41.67, "worst": 0.0, "p10": 10.0, "worst_client": "b"}


def test_answer_frequencies_weigh_and_a_missing_prediction_is_named():
    got = client_accuracies(PREDS, TEST, {"a": ["red"] * 3 + ["blue"]})
    assert got["a"].accuracy == 62.5  # (3 x 0.5 + 1) / 4
    with pytest.raises(DataError, match="question_id 4"):
        client_accuracies({1: "red", 2: "red", 3: "red"}, TEST, {"a": ["red"]})


def test_summary_json_round_trips_the_per_client_accuracies():
    per_client = {"a": ClientAccuracy(accuracy=75.0, coverage=1.0), "b": ClientAccuracy(0.0, 0.5)}
    row = SettingResult(vqa_accuracy=40.0, client_vqa=per_client)
    obj = row.to_json("loss")
    assert obj["client_vqa_worst"] == 0.0 and obj["client_vqa_worst_client"] == "b"
    assert obj["client_vqa_mean"] == 37.5 and obj["client_vqa"]["b"] == {"accuracy": 0.0, "coverage": 0.5}
    assert SettingResult.from_json(obj, loss_name="loss", where="x") == row
    with pytest.raises(DataError, match="x.client_vqa.b"):
        SettingResult.from_json({**obj, "client_vqa": {"b": {"accuracy": 1.0}}}, loss_name="loss", where="x")
    assert worst_client_summary({}) == {}

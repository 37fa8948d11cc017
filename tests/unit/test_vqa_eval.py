"""VQA v2 accuracy: hand-derived goldens for the official metric, its quirks, loading checks and errors."""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import dataclass

import pytest

from fedumm.errors import DataError
from fedumm.eval import vqa
from fedumm.eval.vqa import (
    accuracy_from_answers,
    evaluate,
    evaluate_files,
    normalize_answer,
    question_accuracy,
)

# --------------------------------------------------------------------------------------------
# helpers


def ann(qid: int, answers: list[str], qtype: str = "what is", atype: str = "other", ids: bool = True) -> dict:
    """One annotation record in the official format (answer ids 1..n unless ``ids`` is False)."""
    recs = []
    for k, a in enumerate(answers, start=1):
        rec = {"answer": a, "answer_confidence": "yes"}
        if ids:
            rec["answer_id"] = k
        recs.append(rec)
    return {
        "question_id": qid,
        "image_id": 1000 + qid,
        "question_type": qtype,
        "answer_type": atype,
        "answers": recs,
    }


def questions_for(anns: list[dict]) -> dict:
    """A matching official questions object."""
    return {
        "task_type": "Open-Ended",
        "questions": [
            {"question_id": a["question_id"], "image_id": a["image_id"], "question": "?"} for a in anns
        ],
    }


def res(pairs: dict[int, str]) -> list[dict]:
    """Results list from ``{question_id: answer}``."""
    return [{"question_id": q, "answer": a} for q, a in pairs.items()]


@dataclass
class Sample:
    question_id: int
    answers: list[str]
    answer_type: str = "other"
    question_type: str = "what is"


# --------------------------------------------------------------------------------------------
# leave-one-out accuracy: hand-derived goldens
#
# With 10 distinct gt records of which M equal the result: leaving out a matching record leaves
# M-1 matches, leaving out a non-matching one leaves M; each scores min(1, matches/3) and the
# question's accuracy is the mean of the 10 scores.


def test_ten_of_ten_agree() -> None:
    # every left-out set keeps 9 matches -> min(1, 9/3) = 1 for all 10 -> 1.0
    assert question_accuracy("yes", ["yes"] * 10) == 1.0


def test_three_of_ten() -> None:
    # 3 matching left out: 2 matches -> 2/3 each; 7 others left out: 3 matches -> 1 each
    # (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert question_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9, abs=1e-12)


def test_two_of_ten() -> None:
    # 2 matching left out: 1 match -> 1/3 each; 8 others left out: 2 matches -> 2/3 each
    # (2 * 1/3 + 8 * 2/3) / 10 = (18/3) / 10 = 0.6
    assert question_accuracy("red", ["blue"] * 8 + ["red"] * 2) == pytest.approx(0.6, abs=1e-12)


def test_one_of_ten() -> None:
    # 1 matching left out: 0 matches -> 0; 9 others left out: 1 match -> 1/3 each
    # (0 + 9 * 1/3) / 10 = 3/10
    assert question_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3, abs=1e-12)


def test_four_of_ten_and_none() -> None:
    # 4 matching: left-out sets keep 3 or 4 matches -> 1 everywhere; 0 matching -> 0 everywhere
    assert question_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert question_accuracy("5", ["2"] * 4 + ["3"] * 6) == 0.0


def test_fewer_than_ten_answers() -> None:
    # 3 gt answers, 1 matching: left out -> 0; each of the 2 others left out -> 1/3; (0 + 2/3) / 3 = 2/9
    assert question_accuracy("a1", ["a1", "b", "c"]) == pytest.approx(2 / 9, abs=1e-12)


# --------------------------------------------------------------------------------------------
# processing happens only when the gt answers disagree


def test_no_processing_when_gt_answers_agree() -> None:
    # all 10 gt answers are the same string -> nothing but whitespace is normalised, matching is raw
    assert question_accuracy("Yes", ["yes"] * 10) == 0.0  # case differs
    assert question_accuracy("yes!", ["yes"] * 10) == 0.0  # punctuation kept
    assert question_accuracy("two", ["2"] * 10) == 0.0  # number word not mapped
    assert question_accuracy("the dog", ["dog"] * 10) == 0.0  # article kept
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0  # gt not lower-cased either
    # whitespace is always cleaned: "\n" / "\t" -> space, ends stripped
    assert question_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert question_accuracy("\tyes ", ["yes"] * 10) == 1.0


def test_processing_when_gt_answers_disagree() -> None:
    # 9 x "2" + 1 x "3" disagree -> result "Two" -> "2" matches 9: every left-out set keeps >= 8 -> 1.0
    assert question_accuracy("Two", ["2"] * 9 + ["3"]) == 1.0
    # "yes!" -> "!" becomes a space -> "yes"; 9 matches -> 1.0
    assert question_accuracy("yes!", ["yes"] * 9 + ["no"]) == 1.0
    # gt "the dog" and "dog" are processed to "dog" as well -> all 10 match "a dog" -> 1.0
    assert question_accuracy("a dog", ["dog"] * 5 + ["the dog"] * 5) == 1.0
    # "Yes" and "yes" are distinct strings -> processing lower-cases all of them -> "YES" matches 10
    assert question_accuracy("YES", ["Yes"] * 5 + ["yes"] * 5) == 1.0


def test_distinctness_is_tested_after_whitespace_cleaning() -> None:
    # "yes\t" cleans to "yes": the set has one element -> no processing -> "Yes" does not match
    assert question_accuracy("Yes", ["yes"] * 9 + ["yes\t"]) == 0.0
    # "Yes" vs "yes" are two elements -> processing -> all 10 become "yes" -> 1.0
    assert question_accuracy("Yes", ["yes"] * 9 + ["Yes"]) == 1.0


def test_contraction_in_accuracy() -> None:
    # gt disagree -> result "dont" -> "don't" matches the 3 "don't" answers -> 3 of 10 -> 0.9
    assert question_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9, abs=1e-12)


# --------------------------------------------------------------------------------------------
# normalize_answer: punctuation, periods, commas, numbers, articles, contractions


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),  # manualMap sends "none" to "0"
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("The Dog", "dog"),
        ("an apple a day", "apple day"),
        ("yes!", "yes"),  # "!" -> space, then split/join drops it
        ("dont", "don't"),
        ("whats", "what's"),
        ("Im", "im"),  # capitalised table keys can never match: words are lower-cased first
        ("somebody'd", "somebodyd"),  # the table's reversed entry
        ("girl's", "girl's"),  # apostrophe is not punctuation here
        ("2:30", "2:30"),  # neither is the colon
        ("t-shirt", "t shirt"),  # no space around "-": it becomes a space
        ("black / white", "black white"),  # " /" present: "/" is deleted
        ("red, white", "red white"),  # ", " present: "," is deleted
        ("red,blue", "red blue"),  # no space next to ",", no digit,digit: becomes a space
        ("1,000", "1000"),  # digit,digit: "," deleted
        ("1,000-2,000", "10002000"),  # digit,digit anywhere deletes *every* mark, "-" included
        # each mark's test looks at the input text, not at the text after earlier marks were spaced
        # out: "(" becomes a space first, but "-" still counts as spaceless, so both "-" become spaces
        ("x(-y c-d", "x y c d"),
        ("3.5", "3.5"),  # period before a digit stays
        (".5", ".5"),
        ("end.", "end"),
        ("5.", "5"),  # the look-behind typo: a period after a digit is deleted too
        ("e.g.", "eg"),
        ("p.m. 3.5.", "pm 3.5"),
        ("  multiple \t spaces\n", "multiple spaces"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_without_processing_only_cleans_whitespace() -> None:
    assert normalize_answer("\tThe  Dog!\n", process=False) == "The  Dog!"
    assert normalize_answer("a\nb", process=False) == "a b"


def test_period_strip_count_is_re_unicode() -> None:
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is the count, so at most 32 periods go
    assert re.UNICODE == 32
    assert normalize_answer("." * 32) == ""
    assert normalize_answer("." * 33) == "."
    # 34 "x." pairs: the first 32 periods (leftmost first) are deleted, the last two stay
    assert normalize_answer("x." * 34) == "x" * 33 + ".x."


def test_contractions_table_shape() -> None:
    table = vqa._CONTRACTIONS
    assert len(table) == 120
    assert table["dont"] == "don't"
    assert table["twas"] == "'twas"
    assert table["'ows'at"] == "'ow's'at"
    assert table["let's"] == "let's"
    assert all("’" not in k + v for k, v in table.items())  # ASCII apostrophes only (master)


def test_punctuation_list() -> None:
    assert set(vqa._PUNCTUATION) == set(';/[]"{}()=+\\_-><@`,?!')
    assert "'" not in vqa._PUNCTUATION and ":" not in vqa._PUNCTUATION and "." not in vqa._PUNCTUATION


def test_non_ascii_digits_are_not_digits() -> None:
    # the Python 2 original compiles \d without flags: ASCII only. "٣" is an Arabic-Indic three.
    assert normalize_answer("٣.") == "٣"
    assert normalize_answer("1.٣") == "1٣"
    # not a digit-comma-digit either, so "," and "-" become spaces instead of all marks being deleted
    assert normalize_answer("1,٣-x") == "1 ٣ x"


# --------------------------------------------------------------------------------------------
# evaluate: per-type averages and rounding


def golden_set() -> tuple[dict, dict, list[dict]]:
    anns = [
        ann(1, ["yes"] * 10, "is the", "yes/no"),  # "yes": 10/10 -> 1.0
        ann(2, ["2"] * 2 + ["3"] * 8, "how many", "number"),  # "two" -> "2", 2 of 10 -> 0.6
        ann(3, ["red"] + ["blue"] * 9, "what color", "other"),  # "red", 1 of 10 -> 0.3
        ann(4, ["4"] * 10, "how many", "number"),  # "four": gt agree, no mapping -> 0.0
    ]
    results = res({1: "yes", 2: "two", 3: "red", 4: "four"})
    return questions_for(anns), {"annotations": anns}, results


def test_evaluate_golden() -> None:
    questions, annotations, results = golden_set()
    out = evaluate(questions, annotations, results)
    # overall: (1 + 0.6 + 0.3 + 0) / 4 = 0.475 -> 47.5
    assert out["overall"] == 47.5
    # number: (0.6 + 0) / 2 = 0.3; other: 0.3; yes/no: 1.0
    assert out["perAnswerType"] == {"yes/no": 100.0, "number": 30.0, "other": 30.0}
    assert out["perQuestionType"] == {"is the": 100.0, "how many": 30.0, "what color": 30.0}
    assert out["perQuestion"] == {1: 100.0, 2: 60.0, 3: 30.0, 4: 0.0}
    assert list(out["perQuestionType"]) == ["is the", "how many", "what color"]  # first-seen order


def test_evaluate_rounds_to_two_decimals() -> None:
    anns = [
        ann(1, ["a"] * 10, "t1", "x"),  # 1.0
        ann(2, ["b"] * 10, "t1", "x"),  # 0.0
        ann(3, ["c"] * 10, "t1", "x"),  # 0.0
        ann(4, ["d"] * 2 + ["e"] * 8, "t2", "y"),  # 0.6
        ann(5, ["f"] * 10, "t2", "y"),  # 1.0
        ann(6, ["g"] * 10, "t2", "y"),  # 1.0
    ]
    out = evaluate(
        questions_for(anns), {"annotations": anns}, res({1: "a", 2: "z", 3: "z", 4: "d", 5: "f", 6: "g"})
    )
    # x: 100 * 1 / 3 = 33.333.. -> 33.33; y: 100 * 2.6 / 3 = 86.666.. -> 86.67
    assert out["perAnswerType"] == {"x": 33.33, "y": 86.67}
    assert out["perQuestionType"] == {"t1": 33.33, "t2": 86.67}
    # overall: 100 * 3.6 / 6 = 60.0
    assert out["overall"] == 60.0


def test_evaluate_does_not_mutate_inputs() -> None:
    questions, annotations, results = golden_set()
    before = copy.deepcopy((questions, annotations, results))
    evaluate(questions, annotations, results)
    assert (questions, annotations, results) == before


def test_identical_answer_records_are_left_out_together() -> None:
    # The official finds "the other answers" by dict inequality. Without answer ids, 10 identical
    # records {"answer": "yes", ...} are all removed together -> 0 matches each time -> 0.0
    anns = [ann(1, ["yes"] * 10, ids=False)]
    out = evaluate(questions_for(anns), {"annotations": anns}, res({1: "yes"}))
    assert out["perQuestion"] == {1: 0.0}
    # with answer ids 1..10 the records differ -> exactly one left out -> 1.0
    anns = [ann(1, ["yes"] * 10)]
    assert evaluate(questions_for(anns), {"annotations": anns}, res({1: "yes"}))["perQuestion"] == {1: 100.0}


def test_partly_identical_answer_records() -> None:
    # 3 identical {"answer": "yes"} records + 7 distinct "no" records with ids; result "yes"
    # a "yes" left out removes all three -> 0 matches -> 0; a "no" left out keeps 3 -> 1
    # (3 * 0 + 7 * 1) / 10 = 0.7 (a positional leave-one-out would give 0.9)
    answers = [{"answer": "yes"}] * 3 + [{"answer": "no", "answer_id": k} for k in range(4, 11)]
    anns = [{"question_id": 1, "question_type": "q", "answer_type": "a", "answers": answers}]
    out = evaluate(questions_for([{**anns[0], "image_id": 1}]), {"annotations": anns}, res({1: "yes"}))
    assert out["perQuestion"] == {1: 70.0}


def test_multiple_choice_answers_must_be_choices() -> None:
    anns = [ann(1, ["yes"] * 10)]
    questions = {
        "task_type": "Multiple Choice",
        "questions": [{"question_id": 1, "multiple_choices": ["yes", "no"]}],
    }
    assert evaluate(questions, {"annotations": anns}, res({1: "yes"}))["overall"] == 100.0
    with pytest.raises(DataError, match="not one of the multiple choices"):
        evaluate(questions, {"annotations": anns}, res({1: "maybe"}))


# --------------------------------------------------------------------------------------------
# results loading checks


def test_results_must_cover_exactly_the_annotations() -> None:
    questions, annotations, _ = golden_set()
    with pytest.raises(DataError, match=r"1 question ids of the annotations are missing \(e\.g\. 4\)") as err:
        evaluate(questions, annotations, res({1: "yes", 2: "2", 3: "red", 99: "x"}))
    assert "1 question ids are not in the annotations (e.g. 99)" in str(err.value)


def test_many_missing_ids_are_abbreviated() -> None:
    anns = [ann(q, ["x"] * 10) for q in range(1, 9)]
    with pytest.raises(
        DataError, match=r"7 question ids of the annotations are missing \(e\.g\. 2, 3, 4, 5, 6, \.\.\.\)"
    ):
        evaluate(questions_for(anns), {"annotations": anns}, res({1: "x"}))


def test_duplicated_result_ids() -> None:
    questions, annotations, _ = golden_set()
    results = res({1: "yes", 2: "2", 3: "red", 4: "4"}) + [{"question_id": 2, "answer": "3"}]
    with pytest.raises(DataError, match=r"results\[4\]: question_id 2 is repeated \(first at results\[1\]\)"):
        evaluate(questions, annotations, results)


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"question_id": "3", "answer": "red"}, r"results\[2\]: 'question_id' must be an int"),
        ({"question_id": True, "answer": "red"}, r"results\[2\]: 'question_id' must be an int"),
        ({"answer": "red"}, r"results\[2\]: 'question_id' must be an int"),
        ({"question_id": 3, "answer": 3}, r"results\[2\] \(question_id 3\): 'answer' must be a string"),
        ({"question_id": 3}, r"results\[2\] \(question_id 3\): 'answer' must be a string"),
        (["3", "red"], r"results\[2\] must be an object"),
    ],
)
def test_bad_result_records_name_their_index(record: object, pattern: str) -> None:
    questions, annotations, _ = golden_set()
    results = res({1: "yes", 2: "2"}) + [record] + res({4: "4"})
    with pytest.raises(DataError, match=pattern):
        evaluate(questions, annotations, results)


def test_results_must_be_a_list() -> None:
    questions, annotations, _ = golden_set()
    with pytest.raises(DataError, match="results must be a list"):
        evaluate(questions, annotations, {1: "yes"})


@pytest.mark.parametrize(
    ("annotations", "pattern"),
    [
        ({}, "has no 'annotations' list"),
        ({"annotations": []}, "'annotations' is empty"),
        (
            {"annotations": [ann(1, ["x"] * 10), ann(1, ["y"] * 10)]},
            r"annotations\[1\]: question_id 1 repeats",
        ),
        ({"annotations": [{**ann(1, ["x"]), "answers": []}]}, "'answers' must be a non-empty list"),
        ({"annotations": [{**ann(1, ["x"]), "answer_type": None}]}, "'answer_type' must be a string"),
        ({"annotations": [ann(1, ["x"]) | {"answers": [{"answer": 1}]}]}, r"answers\[0\]\['answer'\]"),
    ],
)
def test_bad_annotations(annotations: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        evaluate({"questions": []}, annotations, res({1: "x"}))


# --------------------------------------------------------------------------------------------
# files


def write(path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_evaluate_files_golden(tmp_path) -> None:
    questions, annotations, results = golden_set()
    q = write(tmp_path / "q.json", questions)
    a = write(tmp_path / "a.json", annotations)
    r = write(tmp_path / "r.json", results)
    out = evaluate_files(q, a, r)
    assert set(out) == {"overall", "perAnswerType", "perQuestionType"}
    full = evaluate(questions, annotations, results)
    assert out == {k: full[k] for k in out}
    assert out["overall"] == 47.5


def test_evaluate_files_missing_and_malformed(tmp_path) -> None:
    questions, annotations, results = golden_set()
    q = write(tmp_path / "q.json", questions)
    a = write(tmp_path / "a.json", annotations)
    r = write(tmp_path / "r.json", results)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"results file .*nope\.json does not exist"):
        evaluate_files(q, a, missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"annotations file .*broken\.json is not valid JSON"):
        evaluate_files(q, str(broken), r)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'["\xe9"]')
    with pytest.raises(DataError, match=r"questions file .*latin\.json is not UTF-8"):
        evaluate_files(str(latin), a, r)
    obj = write(tmp_path / "obj.json", {"question_id": 1, "answer": "yes"})
    with pytest.raises(DataError, match=r"results file .*obj\.json: results must be a list"):
        evaluate_files(q, a, obj)
    no_list = write(tmp_path / "nolist.json", {"info": {}})
    with pytest.raises(DataError, match=r"annotations file .*nolist\.json: has no 'annotations' list"):
        evaluate_files(q, no_list, r)
    bad = write(
        tmp_path / "bad.json", res({1: "yes", 2: "2", 3: "red"}) + [{"question_id": 4, "answer": None}]
    )
    with pytest.raises(DataError, match=r"results file .*bad\.json: results\[3\]"):
        evaluate_files(q, a, bad)


# --------------------------------------------------------------------------------------------
# accuracy_from_answers


def test_accuracy_from_answers_golden() -> None:
    samples = [
        Sample(1, ["yes"] * 10),  # 1.0
        Sample(2, ["2"] * 2 + ["3"] * 8),  # "two" -> 0.6
        Sample(3, ["red"] + ["blue"] * 9),  # 0.3
        Sample(4, ["4"] * 10),  # "four", gt agree -> 0.0
    ]
    # (1 + 0.6 + 0.3 + 0) / 4 -> 47.5, the same as evaluate on the same data
    assert accuracy_from_answers({1: "yes", 2: "two", 3: "red", 4: "four"}, samples) == 47.5
    questions, annotations, results = golden_set()
    assert evaluate(questions, annotations, results)["overall"] == 47.5


def test_accuracy_from_answers_rounds() -> None:
    samples = [Sample(1, ["a"] * 10), Sample(2, ["b"] * 10), Sample(3, ["c"] * 10)]
    # 100 * 1 / 3 -> 33.33
    assert accuracy_from_answers({1: "a", 2: "z", 3: "z"}, samples) == 33.33


def test_accuracy_from_answers_errors() -> None:
    samples = [Sample(1, ["a"] * 10), Sample(2, ["b"] * 10)]
    with pytest.raises(DataError, match=r"1 question ids of the samples are missing \(e\.g\. 2\)"):
        accuracy_from_answers({1: "a"}, samples)
    with pytest.raises(DataError, match=r"1 question ids are not in the samples \(e\.g\. 7\)"):
        accuracy_from_answers({1: "a", 2: "b", 7: "c"}, samples)
    with pytest.raises(DataError, match=r"samples\[1\]: question_id 1 repeats samples\[0\]"):
        accuracy_from_answers({1: "a"}, [Sample(1, ["a"]), Sample(1, ["a"])])
    with pytest.raises(DataError, match=r"samples\[0\] has no 'question_id' or 'answers'"):
        accuracy_from_answers({1: "a"}, [object()])
    with pytest.raises(DataError, match=r"samples\[0\] \(question_id 1\) answers is empty"):
        accuracy_from_answers({1: "a"}, [Sample(1, [])])
    with pytest.raises(DataError, match=r"predictions\[1\] must be a string"):
        accuracy_from_answers({1: 5}, samples)
    with pytest.raises(DataError, match="samples is empty"):
        accuracy_from_answers({}, [])


def test_question_accuracy_input_errors() -> None:
    with pytest.raises(DataError, match="list of answer strings"):
        question_accuracy("yes", "yes")
    with pytest.raises(DataError, match="is empty"):
        question_accuracy("yes", [])
    with pytest.raises(DataError, match=r"gt answers\[1\] must be a string"):
        question_accuracy("yes", ["yes", None])
    with pytest.raises(DataError, match="result answer must be a string"):
        question_accuracy(None, ["yes"])


# --------------------------------------------------------------------------------------------
# test-only parity reference: our own re-statement of the official control flow (answer dicts
# rewritten in place on a copy, "other answers" found by dict inequality, sums in file order),
# used to cross-check evaluate() on random tricky data. The text steps are re-stated char by char
# rather than with the module's helpers; the period pattern is the official one, verbatim.

_REF_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_REF_NUMBERS = dict(
    zip(
        ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
        ["0", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"],
        strict=True,
    )
)


def _ref_punct(text: str) -> str:
    if re.search(r"(\d)(,)(\d)", text, re.ASCII):
        dropped = set(_REF_PUNCT)
    else:
        dropped = {p for p in _REF_PUNCT if p + " " in text or " " + p in text}
    out = "".join("" if c in dropped else " " if c in _REF_PUNCT else c for c in text)
    return re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII).sub("", out, count=re.UNICODE)


def _ref_digit_article(text: str) -> str:
    words = [_REF_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(vqa._CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def _ref_evaluate(annotations: dict, results: list[dict]) -> dict:
    gts = copy.deepcopy(annotations["annotations"])
    by_id = {r["question_id"]: r["answer"] for r in results}
    acc_qa, acc_q, acc_a, per_q = [], {}, {}, {}
    for a in gts:
        for rec in a["answers"]:
            rec["answer"] = rec["answer"].replace("\n", " ").replace("\t", " ").strip()
        r = by_id[a["question_id"]].replace("\n", " ").replace("\t", " ").strip()
        if len({rec["answer"] for rec in a["answers"]}) > 1:
            for rec in a["answers"]:
                rec["answer"] = _ref_digit_article(_ref_punct(rec["answer"]))
            r = _ref_digit_article(_ref_punct(r))
        scores = []
        for held in a["answers"]:
            others = [o for o in a["answers"] if o != held]
            scores.append(min(1, float(len([o for o in others if o["answer"] == r])) / 3))
        avg = float(sum(scores)) / len(scores)
        acc_qa.append(avg)
        acc_q.setdefault(a["question_type"], []).append(avg)
        acc_a.setdefault(a["answer_type"], []).append(avg)
        per_q[a["question_id"]] = round(100 * avg, 2)
    return {
        "overall": round(100 * float(sum(acc_qa)) / len(acc_qa), 2),
        "perAnswerType": {k: round(100 * float(sum(v)) / len(v), 2) for k, v in acc_a.items()},
        "perQuestionType": {k: round(100 * float(sum(v)) / len(v), 2) for k, v in acc_q.items()},
        "perQuestion": per_q,
    }


# Families of answers that processing may or may not make equal.
_FAMILIES = [
    ["yes", "Yes", "yes!", " yes\n", "YES"],
    ["no", "No.", "no"],
    ["2", "two", "Two", "2."],
    ["0", "none", "zero", "None"],
    ["dog", "the dog", "a dog", "Dog", "dog."],
    ["don't", "dont", "Dont"],
    ["1000", "1,000", "1 000"],
    ["3.5", "3.5.", "3,5"],
    ["end", "end.", "end!"],
    ["t-shirt", "t shirt", "tshirt"],
    ["red white", "red, white", "red/white", "red / white"],
    ["eg", "e.g.", "e.g"],
]
_TRICKY = [a for family in _FAMILIES for a in family]


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_reference_restatement(seed: int) -> None:
    rng = random.Random(seed)
    anns, answers = [], {}
    for qid in range(1, 301):
        pool = [a for family in rng.sample(_FAMILIES, rng.randint(1, 2)) for a in family]
        pool = rng.sample(pool, rng.randint(1, min(4, len(pool))))
        gt = [rng.choice(pool) for _ in range(10)]
        a = ann(
            qid, gt, rng.choice(["how many", "what is", "is the"]), rng.choice(["number", "other", "yes/no"])
        )
        if rng.random() < 0.2:  # some records without ids, so equal dicts occur
            for rec in a["answers"]:
                del rec["answer_id"]
        anns.append(a)
        answers[qid] = rng.choice(pool if rng.random() < 0.6 else _TRICKY)
    annotations, results = {"annotations": anns}, res(answers)
    assert evaluate(questions_for(anns), annotations, results) == _ref_evaluate(annotations, results)

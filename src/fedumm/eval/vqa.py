"""VQA v2 accuracy, computed exactly as the official evaluation does.

Reference: https://github.com/GT-Vision-Lab/VQA (master), files
``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (class ``VQAEval``: ``evaluate``,
``processPunctuation``, ``processDigitArticle``, ``setAccuracy``) and
``PythonHelperTools/vqaTools/vqa.py`` (``VQA.loadRes``). This is an independent re-implementation
of that behaviour, quirks included:

* Whitespace: every ground-truth (gt) answer and the result answer get ``\\n`` and ``\\t`` replaced
  by a space and the ends stripped. Nothing else is done to them unless the gt answers disagree.
* Only when the whitespace-cleaned gt answers of a question hold more than one distinct string
  (``len(set(gtAnswers)) > 1``) are *all* gt answers and the result answer put through punctuation
  and digit/article processing. When all gt answers are the same string, matching is raw and
  case-sensitive: gt ``"yes"`` x10 against result ``"Yes"`` or ``"yes!"`` scores 0.
* Punctuation: for each mark of the list below, if the input text contains the mark followed or
  preceded by a space, or the text contains a digit-comma-digit anywhere, the mark is deleted,
  otherwise it becomes a space. The tests always look at the text as it was before any mark was
  replaced. Apostrophe, colon and period are not in the list.
* Periods: the official pattern ``(?!<=\\d)(\\.)(?!\\d)`` starts with a *lookahead* for the literal
  ``<=`` (a typo for the look-behind ``(?<!\\d)``), which never matches in front of a period; so
  every period not followed by a digit is deleted ("5." -> "5", "3.5" stays). The pattern's
  ``sub`` is called with ``re.UNICODE`` as its third positional argument, which is the *count*:
  at most ``re.UNICODE == 32`` periods are deleted. The original runs under Python 2 with patterns
  compiled without flags, so ``\\d`` there means ASCII ``[0-9]``; so it does here.
* Digits/articles: lower-case, split on whitespace, number words ``none``/``zero``..``ten`` become
  digits (``none`` -> ``0``), articles ``a``/``an``/``the`` are dropped, then whole words found in the
  contractions table are replaced (``dont`` -> ``don't``); words are joined with single spaces.
* Leave-one-out: for each gt answer record, the result is compared with the *other* records;
  the score is ``min(1, matches / 3)`` and the question's accuracy is the mean over the records.
  The official code finds "the other records" by dict inequality, so records that are equal as a
  whole (possible only without distinct ``answer_id`` values) are left out together; ``evaluate``
  reproduces that, on official files (ids 1..10) it is exactly "the other 9".
* Averages: overall, per answer type and per question type are plain means of the per-question
  accuracies, reported as ``round(100 * sum / n, 2)`` with Python 3's ``round``. (The original runs
  under Python 2, whose ``round`` differs only on exact binary ties such as 12.125.)
* Results loading: the result question ids must be exactly the annotations' ids; for a
  "Multiple Choice" questions file each answer must be one of the question's choices.
* Output: ``evaluate`` returns ``overall``, ``perAnswerType`` and ``perQuestionType`` like the
  official ``VQAEval.accuracy``, plus ``perQuestion`` (question id -> percent rounded to 2 decimals,
  like the official ``evalQA``; averaging those rounded values need not give ``overall`` exactly).

Differences on purpose: bad input raises :class:`fedumm.errors.DataError` instead of an assertion
or KeyError, repeated result (or annotation) question ids are refused instead of the last one
silently winning, and nothing is mutated or printed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedumm.errors import DataError

__all__ = [
    "accuracy_from_answers",
    "evaluate",
    "evaluate_files",
    "normalize_answer",
    "question_accuracy",
]

# Digits used to report percentages, as the official ``VQAEval(n=2)``.
_DECIMALS = 2
# A gt answer given by this many other annotators makes a result fully correct.
_FULL_CREDIT_MATCHES = 3
# The official periodStrip.sub passes re.UNICODE (== 32) where the count argument goes.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
# Answers repeat a lot across questions: the pure text steps keep this many recent results.
_CACHE_SIZE = 1 << 16
# How many example ids an error message lists.
_EXAMPLE_IDS = 5

# Marks handled by the punctuation step (apostrophe, colon and period are not among them).
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions table of the official evaluation, one "word replacement" pair per line. Its odd
# entries are kept as they are: "somebody'd" maps to "somebodyd", a few keys map to themselves,
# and the capitalised keys (Id've, I'dve, Im, Ive) can never match because words are lower-cased first.
_CONTRACTION_PAIRS = """
aint ain't
arent aren't
cant can't
couldve could've
couldnt couldn't
couldn'tve couldn't've
couldnt've couldn't've
didnt didn't
doesnt doesn't
dont don't
hadnt hadn't
hadnt've hadn't've
hadn'tve hadn't've
hasnt hasn't
havent haven't
hed he'd
hed've he'd've
he'dve he'd've
hes he's
howd how'd
howll how'll
hows how's
Id've I'd've
I'dve I'd've
Im I'm
Ive I've
isnt isn't
itd it'd
itd've it'd've
it'dve it'd've
itll it'll
let's let's
maam ma'am
mightnt mightn't
mightnt've mightn't've
mightn'tve mightn't've
mightve might've
mustnt mustn't
mustve must've
neednt needn't
notve not've
oclock o'clock
oughtnt oughtn't
ow's'at 'ow's'at
'ows'at 'ow's'at
'ow'sat 'ow's'at
shant shan't
shed've she'd've
she'dve she'd've
she's she's
shouldve should've
shouldnt shouldn't
shouldnt've shouldn't've
shouldn'tve shouldn't've
somebody'd somebodyd
somebodyd've somebody'd've
somebody'dve somebody'd've
somebodyll somebody'll
somebodys somebody's
someoned someone'd
someoned've someone'd've
someone'dve someone'd've
someonell someone'll
someones someone's
somethingd something'd
somethingd've something'd've
something'dve something'd've
somethingll something'll
thats that's
thered there'd
thered've there'd've
there'dve there'd've
therere there're
theres there's
theyd they'd
theyd've they'd've
they'dve they'd've
theyll they'll
theyre they're
theyve they've
twas 'twas
wasnt wasn't
wed've we'd've
we'dve we'd've
weve we've
werent weren't
whatll what'll
whatre what're
whats what's
whatve what've
whens when's
whered where'd
wheres where's
whereve where've
whod who'd
whod've who'd've
who'dve who'd've
wholl who'll
whos who's
whove who've
whyll why'll
whyre why're
whys why's
wont won't
wouldve would've
wouldnt wouldn't
wouldnt've wouldn't've
wouldn'tve wouldn't've
yall y'all
yall'll y'all'll
y'allll y'all'll
yall'd've y'all'd've
y'alld've y'all'd've
y'all'dve y'all'd've
youd you'd
youd've you'd've
you'dve you'd've
youll you'll
youre you're
youve you've
"""
_CONTRACTIONS = dict(line.split(" ") for line in _CONTRACTION_PAIRS.strip().splitlines())


# --------------------------------------------------------------------------------------------
# answer normalisation


def _clean_whitespace(text: str) -> str:
    """Turn newlines and tabs into spaces and strip both ends, as done to every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _process_punctuation(text: str) -> str:
    """Delete or space out punctuation marks, then delete periods not followed by a digit."""
    delete_every_mark = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The decision looks at the text as given, not at the partly replaced ``out``.
        if delete_every_mark or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _process_digit_article(text: str) -> str:
    """Lower-case, map number words to digits, drop articles and restore contractions."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _require_str(value: Any, what: str) -> str:
    """Return ``value`` if it is a str, else raise DataError naming ``what``."""
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    return value


def normalize_answer(answer: str, *, process: bool = True) -> str:
    """Clean an answer's whitespace and, when ``process``, its punctuation, numbers, articles and case."""
    text = _clean_whitespace(_require_str(answer, "answer"))
    if process:
        text = _process_digit_article(_process_punctuation(text))
    return text


# --------------------------------------------------------------------------------------------
# per-question accuracy


def _leave_one_out(
    result: str, answers: Sequence[str], same: Callable[[int, int], bool] | None = None
) -> float:
    """Mean over gt answers ``i`` of ``min(1, matches among answers j with not same(i, j) / 3)``."""
    hits = [answer == result for answer in answers]
    if same is None:
        # Only answer i itself is left out: the others hold all matches but its own.
        total = sum(hits)
        counts = [total - hit for hit in hits]
    else:
        counts = [sum(1 for j, hit in enumerate(hits) if hit and not same(i, j)) for i in range(len(hits))]
    scores = [min(1, count / _FULL_CREDIT_MATCHES) for count in counts]
    return float(sum(scores)) / len(scores)


def _prepare(result: str, gt_answers: Sequence[str]) -> tuple[str, list[str]]:
    """Clean whitespace everywhere and process everything only when the gt answers disagree."""
    result = _clean_whitespace(result)
    answers = [_clean_whitespace(a) for a in gt_answers]
    if len(set(answers)) > 1:
        answers = [_process_digit_article(_process_punctuation(a)) for a in answers]
        result = _process_digit_article(_process_punctuation(result))
    return result, answers


def _check_gt_answers(gt_answers: Any, what: str) -> list[str]:
    """Return the gt answers as a non-empty list of str, or raise DataError naming ``what``."""
    if isinstance(gt_answers, (str, bytes)) or not isinstance(gt_answers, Iterable):
        raise DataError(f"{what} must be a list of answer strings, got {type(gt_answers).__name__}")
    answers = list(gt_answers)
    if not answers:
        raise DataError(f"{what} is empty: a question needs at least one ground-truth answer")
    for k, answer in enumerate(answers):
        _require_str(answer, f"{what}[{k}]")
    return answers


def question_accuracy(result_answer: str, gt_answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one result against its gt answers (official leave-one-out mean)."""
    result = _require_str(result_answer, "result answer")
    answers = _check_gt_answers(gt_answers, "gt answers")
    result, answers = _prepare(result, answers)
    return _leave_one_out(result, answers)


def _record_identity(
    records: Sequence[Mapping[str, Any]], answers: Sequence[str]
) -> Callable[[int, int], bool] | None:
    """Which answer records the official dict-inequality test treats as one; None when all differ."""
    ids = [r.get("answer_id") for r in records]
    if all(_is_int(i) or isinstance(i, str) for i in ids) and len(set(ids)) == len(ids):
        # Distinct answer ids: no two records are equal, so exactly one is left out each time.
        return None
    # The official compares the records as whole dicts after their answer has been rewritten.
    rewritten = [{**r, "answer": a} for r, a in zip(records, answers, strict=True)]
    return lambda i, j: rewritten[i] == rewritten[j]


# --------------------------------------------------------------------------------------------
# input checks


def _examples(ids: Iterable[int]) -> str:
    """A few sorted ids for an error message."""
    chosen = sorted(ids)
    shown = ", ".join(str(i) for i in chosen[:_EXAMPLE_IDS])
    return shown + (", ..." if len(chosen) > _EXAMPLE_IDS else "")


def _is_int(value: Any) -> bool:
    """True for ints that are not bools."""
    return isinstance(value, int) and not isinstance(value, bool)


def _list_field(obj: Any, key: str, where: str) -> list[Any]:
    """Return ``obj[key]`` as a list, or raise DataError naming ``where``."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with a {key!r} list, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: has no {key!r} list")
    value = obj[key]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DataError(f"{where}: {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def _check_annotations(annotations: Any, where: str) -> list[Mapping[str, Any]]:
    """Validate the annotations object; return its records in file order."""
    records = _list_field(annotations, "annotations", where)
    if not records:
        raise DataError(f"{where}: 'annotations' is empty, there is nothing to evaluate")
    seen: dict[int, int] = {}
    for k, ann in enumerate(records):
        at = f"{where}: annotations[{k}]"
        if not isinstance(ann, Mapping):
            raise DataError(f"{at} must be an object, got {type(ann).__name__}")
        qid = ann.get("question_id")
        if not _is_int(qid):
            raise DataError(f"{at}: 'question_id' must be an int, got {qid!r}")
        if qid in seen:
            raise DataError(f"{at}: question_id {qid} repeats annotations[{seen[qid]}]")
        seen[qid] = k
        for key in ("question_type", "answer_type"):
            _require_str(ann.get(key), f"{at} (question_id {qid}) {key!r}")
        answers = ann.get("answers")
        if isinstance(answers, (str, bytes, Mapping)) or not isinstance(answers, Sequence) or not answers:
            raise DataError(f"{at} (question_id {qid}): 'answers' must be a non-empty list, got {answers!r}")
        for m, rec in enumerate(answers):
            if not isinstance(rec, Mapping):
                raise DataError(f"{at} (question_id {qid}): answers[{m}] must be an object, got {rec!r}")
            _require_str(rec.get("answer"), f"{at} (question_id {qid}): answers[{m}]['answer']")
    return records


def _check_results(results: Any, where: str) -> dict[int, str]:
    """Validate result records; return question id -> answer, refusing repeated ids."""
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Sequence):
        raise DataError(f"{where}: results must be a list of objects, got {type(results).__name__}")
    answers: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for k, rec in enumerate(results):
        at = f"{where}: results[{k}]"
        if not isinstance(rec, Mapping):
            raise DataError(f"{at} must be an object with 'question_id' and 'answer', got {rec!r}")
        qid = rec.get("question_id")
        if not _is_int(qid):
            raise DataError(f"{at}: 'question_id' must be an int, got {qid!r}")
        answer = rec.get("answer")
        if not isinstance(answer, str):
            raise DataError(f"{at} (question_id {qid}): 'answer' must be a string, got {answer!r}")
        if qid in answers:
            raise DataError(f"{at}: question_id {qid} is repeated (first at results[{first_index[qid]}])")
        answers[qid] = answer
        first_index[qid] = k
    return answers


def _check_same_ids(expected: Iterable[int], given: Iterable[int], *, where: str, what: str, of: str) -> None:
    """Raise DataError unless the id sets are equal, naming how many ids are missing and extra."""
    expected_set, given_set = set(expected), set(given)
    if expected_set == given_set:
        return
    missing = expected_set - given_set
    extra = given_set - expected_set
    parts = []
    if missing:
        parts.append(f"{len(missing)} question ids of the {of} are missing (e.g. {_examples(missing)})")
    if extra:
        parts.append(f"{len(extra)} question ids are not in the {of} (e.g. {_examples(extra)})")
    raise DataError(f"{where}: {what} do not cover exactly the question ids of the {of}: " + "; ".join(parts))


def _check_multiple_choice(questions: Any, results: Mapping[int, str], where: str) -> None:
    """For a Multiple Choice questions file, require each answer to be one of its question's choices."""
    if not isinstance(questions, Mapping) or questions.get("task_type") != "Multiple Choice":
        return
    choices: dict[Any, Any] = {}
    for q in _list_field(questions, "questions", where):
        if isinstance(q, Mapping):
            choices[q.get("question_id")] = q.get("multiple_choices")
    for qid, answer in results.items():
        options = choices.get(qid)
        if not isinstance(options, Sequence) or isinstance(options, (str, bytes)):
            raise DataError(f"{where}: question_id {qid} has no 'multiple_choices' list")
        if answer not in options:
            raise DataError(f"question_id {qid}: answer {answer!r} is not one of the multiple choices")


# --------------------------------------------------------------------------------------------
# dataset-level accuracy


def _percent(values: Sequence[float]) -> float:
    """Mean of accuracies in [0, 1] as a percentage rounded like the official ``setAccuracy``."""
    return round(100 * float(sum(values)) / len(values), _DECIMALS)


def _evaluate(
    questions: Any,
    annotations: Any,
    results: Any,
    *,
    where: tuple[str, str, str] = ("questions", "annotations", "results"),
) -> dict[str, Any]:
    """Shared body of ``evaluate`` and ``evaluate_files``; ``where`` names the three inputs."""
    q_where, a_where, r_where = where
    _list_field(questions, "questions", q_where)
    records = _check_annotations(annotations, a_where)
    answers_by_id = _check_results(results, r_where)
    _check_same_ids(
        (a["question_id"] for a in records), answers_by_id, where=r_where, what="results", of="annotations"
    )
    _check_multiple_choice(questions, answers_by_id, q_where)

    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    scores = []
    for ann in records:
        gt_records = list(ann["answers"])
        result, gt = _prepare(answers_by_id[ann["question_id"]], [r["answer"] for r in gt_records])
        score = _leave_one_out(result, gt, _record_identity(gt_records, gt))
        scores.append(score)
        by_question_type.setdefault(ann["question_type"], []).append(score)
        by_answer_type.setdefault(ann["answer_type"], []).append(score)
        per_question[ann["question_id"]] = round(100 * score, _DECIMALS)
    return {
        "overall": _percent(scores),
        "perAnswerType": {k: _percent(v) for k, v in by_answer_type.items()},
        "perQuestionType": {k: _percent(v) for k, v in by_question_type.items()},
        "perQuestion": per_question,
    }


def evaluate(
    questions: Mapping[str, Any], annotations: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Official VQA accuracy of ``results`` in percent: overall, per answer/question type and per question."""
    return _evaluate(questions, annotations, results)


def _read_json(path: str | Path, role: str) -> Any:
    """Parse a JSON file, or raise DataError naming the file and its role."""
    p = Path(path)
    try:
        with p.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise DataError(f"{role} file {p} does not exist") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{role} file {p} is a directory") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{role} file {p} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{role} file {p} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{role} file {p} cannot be read: {exc}") from exc


def evaluate_files(
    questions_path: str | Path, annotations_path: str | Path, results_path: str | Path
) -> dict[str, Any]:
    """Evaluate a results file against the official questions and annotations files (no perQuestion)."""
    questions = _read_json(questions_path, "questions")
    annotations = _read_json(annotations_path, "annotations")
    results = _read_json(results_path, "results")
    where = (
        f"questions file {questions_path}",
        f"annotations file {annotations_path}",
        f"results file {results_path}",
    )
    out = _evaluate(questions, annotations, results, where=where)
    return {key: out[key] for key in ("overall", "perAnswerType", "perQuestionType")}


def accuracy_from_answers(predictions: Mapping[int, str], samples: Iterable[Any]) -> float:
    """Overall VQA accuracy in percent (rounded like the official) of ``predictions`` on ``samples``."""
    if not isinstance(predictions, Mapping):
        kind = type(predictions).__name__
        raise DataError(f"predictions must be a mapping question_id -> answer, got {kind}")
    for qid, answer in predictions.items():
        if not _is_int(qid):
            raise DataError(f"predictions: key {qid!r} is not an int question id")
        _require_str(answer, f"predictions[{qid}]")
    scores = []
    seen: dict[int, int] = {}
    for k, sample in enumerate(samples):
        try:
            qid, gt_answers = sample.question_id, sample.answers
        except AttributeError as exc:
            raise DataError(f"samples[{k}] has no 'question_id' or 'answers' attribute: {sample!r}") from exc
        if not _is_int(qid):
            raise DataError(f"samples[{k}]: question_id must be an int, got {qid!r}")
        if qid in seen:
            raise DataError(f"samples[{k}]: question_id {qid} repeats samples[{seen[qid]}]")
        seen[qid] = k
        answers = _check_gt_answers(gt_answers, f"samples[{k}] (question_id {qid}) answers")
        if qid in predictions:
            result, gt = _prepare(predictions[qid], answers)
            scores.append(_leave_one_out(result, gt))
    if not seen:
        raise DataError("samples is empty, there is nothing to evaluate")
    _check_same_ids(seen, predictions, where="predictions", what="predictions", of="samples")
    return _percent(scores)

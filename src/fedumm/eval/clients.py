"""Each client's accuracy on its own answer distribution, and the worst-client summary of a run.

Under non-IID data the global test accuracy is an average over the test split's answer mix, which
no client holds; a client whose answers are rare elsewhere can be served badly while the average
looks fine. The accuracy a client would measure on a test set drawn from its own answer
distribution p_k is, in expectation,

    acc_k = sum_a p_k(a) acc(a) / sum_{a in test} p_k(a),

where acc(a) is the model's mean VQA accuracy on the test questions whose answer (the annotators'
``multiple_choice_answer``) is a. It is computed from one pass over the test split (the predictions
the global evaluation made anyway), without drawing K test sets; ``coverage`` is the share of the
client's training answers that occur in the test split at all (the part of p_k acc_k speaks for).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from fedumm.errors import DataError
from fedumm.eval.vqa import question_accuracy
from fedumm.summary import ClientAccuracy

__all__ = ["client_accuracies"]


def client_accuracies(
    predictions: Mapping[int, str], test: Sequence, client_answers: Mapping[str, Sequence[str]]
) -> dict[str, ClientAccuracy]:
    """Per client, the accuracy of ``predictions`` (question id -> answer) reweighted to its answers.

    ``client_answers`` lists each client's training answers (one per VQA example); clients without
    any, or whose answers never occur in the test split, are left out.
    """
    by_answer: dict[str, list[float]] = defaultdict(list)
    for s in test:
        if s.question_id not in predictions:
            raise DataError(f"question_id {s.question_id} of the test split has no prediction")
        by_answer[s.multiple_choice_answer].append(question_accuracy(predictions[s.question_id], s.answers))
    acc_of = {a: float(np.mean(v)) for a, v in by_answer.items()}
    out: dict[str, ClientAccuracy] = {}
    for cid, answers in client_answers.items():
        counts = Counter(answers)
        total = sum(counts.values())
        covered = {a: n for a, n in counts.items() if a in acc_of}
        mass = sum(covered.values())
        if not total or not mass:
            continue
        acc = sum(n * acc_of[a] for a, n in covered.items()) / mass
        out[cid] = ClientAccuracy(accuracy=round(100.0 * acc, 2), coverage=round(mass / total, 4))
    return out

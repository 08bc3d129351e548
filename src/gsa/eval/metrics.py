"""Scoring metrics for generated answers, following the LongBench definitions for English tasks.

Every metric compares one prediction with one gold answer and returns a score in [0, 1].
``METRICS`` maps the metric names that ``Sample.metric`` uses to these functions, and
``score_sample`` scores a prediction against all gold answers of a sample and keeps the maximum,
as LongBench does.

The definitions follow ``metrics.py`` and ``eval.py`` of LongBench (github.com/THUDM/LongBench),
reimplemented here without its ``rouge`` and ``fuzzywuzzy`` dependencies.
Known differences are marked with NOTE at the function they affect.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from gsa.errors import InvalidInputError

MetricFunction = Callable[..., float]

LONGBENCH_METRICS: dict[str, str] = {
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "triviaqa": "qa_f1",
    "passage_retrieval_en": "retrieval",
    "gov_report": "rouge_l",
    "lcc": "code_sim",
}
"""Metric name of each LongBench English task that this package evaluates."""

LONGBENCH_FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""LongBench tasks whose prediction is cut to its first line before scoring.

These are LongBench's few-shot tasks, whose prompts end in examples that a model may continue past
its answer. A task loader marks their samples with ``extra["first_line"] = True``, which ``score_sample`` reads.
"""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")
_PARAGRAPH_NUMBER = re.compile(r"Paragraph (\d+)")
_CODE_SKIP_PREFIXES = ("`", "#", "//")

# An option letter A-D that is not part of a longer word, such as "A", "(A)" or "A.".
_OPTION_LETTER = re.compile(r"(?<![\w'-])([A-D])(?![\w'-])")
# An option letter after a cue word: "Answer: A", "the answer is (B)", "option C", "choice D".
_CUED_OPTION_LETTER = re.compile(
    r"\b(?i:answer|option|choice)\b(?:\s+(?i:is))?\s*[:.]?\s*\(?([A-D])(?![\w'-])"
)
_GOLD_OPTION_LETTER = re.compile(r"^\(?([A-Da-d])(?:[).:]|$)")


# Text normalisation


def normalize_answer(text: str) -> str:
    """Normalise an English answer: lower-case, drop punctuation and the articles a/an/the, collapse whitespace.

    This is the SQuAD normalisation that LongBench applies to English QA answers, in the same order.
    """
    lowered = text.lower()
    without_punctuation = "".join(character for character in lowered if character not in _PUNCTUATION)
    without_articles = _ARTICLES.sub(" ", without_punctuation)
    return " ".join(without_articles.split())


def prepare_prediction(prediction: str, *, first_line: bool = False) -> str:
    """Cut the prediction to its first line when ``first_line`` is set, after dropping leading newlines.

    LongBench does this for the tasks in ``LONGBENCH_FIRST_LINE_TASKS``.
    """
    if not first_line:
        return prediction
    return prediction.lstrip("\n").split("\n")[0]


# Token overlap and subsequence metrics


def qa_f1(prediction: str, gold: str) -> float:
    """Compute the token-level F1 between the normalised prediction and gold answer.

    Tokens are compared as bags, so a repeated token counts as often as it occurs in both texts.
    The score is 0.0 when the texts share no token, which includes an empty prediction or gold answer.
    """
    prediction_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()

    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0

    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _longest_common_subsequence(first: Sequence[str], second: Sequence[str]) -> int:
    """Return the length of the longest common subsequence of two token sequences."""
    previous = [0] * (len(second) + 1)
    for first_item in first:
        current = [0] * (len(second) + 1)
        for j, second_item in enumerate(second, start=1):
            if first_item == second_item:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """Compute the ROUGE-L F-measure from the longest common subsequence of lower-cased whitespace tokens.

    The F-measure is the harmonic mean of precision (LCS / prediction tokens) and recall (LCS / gold tokens).
    The score is 0.0 when the texts share no token, which includes an empty prediction or gold answer.

    NOTE: LongBench scores with the ``rouge`` package from PyPI (pltrdy/rouge), which its README states
    may differ slightly from the official ROUGE script. This function computes one LCS over the whole
    texts with the plain harmonic mean, so its values can differ from that package's.
    """
    prediction_tokens = prediction.lower().split()
    gold_tokens = gold.lower().split()

    common_length = _longest_common_subsequence(prediction_tokens, gold_tokens)
    if common_length == 0:
        return 0.0

    precision = common_length / len(prediction_tokens)
    recall = common_length / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# Classification, retrieval and counting


def classification_score(prediction: str, gold: str, all_classes: Sequence[str] | None) -> float:
    """Score a class-label prediction as LongBench does for TREC and LSHT.

    The matches are the classes in ``all_classes`` that occur in the prediction as substrings.
    A match that is a substring of the gold answer but not equal to it is dropped, so that the gold
    class "Location" is not penalised by the shorter class "Loc" it contains. The score is
    1 / (number of matches) when the gold answer is among the matches, and 0.0 otherwise.

    Raises:
        InvalidInputError: ``all_classes`` is missing.

    NOTE: LongBench removes items from the match list while iterating over it, so when two matches in
    a row must be dropped it keeps the second one. This function drops every such match.
    """
    if all_classes is None:
        raise InvalidInputError(
            "missing class names for the classification metric; pass them as extra['all_classes']"
        )

    matches = [name for name in all_classes if name in prediction]
    matches = [name for name in matches if not (name in gold and name != gold)]
    if gold not in matches:
        return 0.0
    return 1.0 / len(matches)


def _fraction_equal(numbers: list[str], target: str) -> float:
    """Return the fraction of ``numbers`` equal to ``target``, or 0.0 when ``numbers`` is empty."""
    if not numbers:
        return 0.0
    return numbers.count(target) / len(numbers)


def retrieval_score(prediction: str, gold: str) -> float:
    """Score passage retrieval: the fraction of numbers in the prediction that equal the gold paragraph number.

    The gold number is taken from "Paragraph N" in the gold answer, or else from its first number.
    The score is 0.0 when the prediction contains no number. Numbers are compared as digit strings,
    as LongBench does, so "07" does not equal "7".

    Raises:
        InvalidInputError: the gold answer contains no number.
    """
    paragraph = _PARAGRAPH_NUMBER.search(gold)
    if paragraph is not None:
        gold_number = paragraph.group(1)
    else:
        gold_numbers = _NUMBER.findall(gold)
        if not gold_numbers:
            raise InvalidInputError(
                f"invalid retrieval gold answer {gold!r} without a number; expected a form like 'Paragraph 12'"
            )
        gold_number = gold_numbers[0]

    return _fraction_equal(_NUMBER.findall(prediction), gold_number)


def count_score(prediction: str, gold: str) -> float:
    """Score passage counting: the fraction of numbers in the prediction that equal the gold count.

    The score is 0.0 when the prediction contains no number. Numbers are compared as digit strings.

    Raises:
        InvalidInputError: the gold answer is not a whole number.
    """
    gold_count = gold.strip()
    if not gold_count.isdigit():
        raise InvalidInputError(f"invalid count gold answer {gold!r}; expected a whole number such as '12'")

    return _fraction_equal(_NUMBER.findall(prediction), gold_count)


# Code similarity


def _levenshtein_distance(first: str, second: str) -> int:
    """Return the Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    previous = list(range(len(second) + 1))
    for i, first_char in enumerate(first, start=1):
        current = [i] + [0] * len(second)
        for j, second_char in enumerate(second, start=1):
            substitution = previous[j - 1] + (first_char != second_char)
            current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution)
        previous = current
    return previous[-1]


def _first_code_line(prediction: str) -> str:
    """Return the first line that is not empty and does not start with '`', '#' or '//', or '' if none."""
    for line in prediction.split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith(_CODE_SKIP_PREFIXES):
            return line
    return ""


def code_sim(prediction: str, gold: str) -> float:
    """Compute the edit similarity between the first code line of the prediction and the gold line.

    Empty lines, markdown fences and comment lines are skipped, where a comment line starts with '#' or '//'
    after its indentation. The similarity is 1 - Levenshtein distance / length of the longer string,
    on characters. Two empty strings are identical and score 1.0.

    NOTE: LongBench computes ``fuzzywuzzy.fuzz.ratio / 100``, which rounds to whole percent and
    weights edits differently, so its values can differ slightly from this normalised Levenshtein
    similarity. LongBench also skips every line that contains '`', '#' or '//' anywhere, including
    code with a trailing comment, and does not skip empty lines.
    """
    code_line = _first_code_line(prediction)

    longer_length = max(len(code_line), len(gold))
    if longer_length == 0:
        return 1.0
    return 1.0 - _levenshtein_distance(code_line, gold) / longer_length


# Exact and containment matching


def contains_answer(prediction: str, gold: str) -> float:
    """Return 1.0 when the normalised gold answer occurs in the normalised prediction, else 0.0.

    A gold answer that normalises to the empty string scores 0.0, because it occurs in every text.
    """
    normalized_gold = normalize_answer(gold)
    if not normalized_gold:
        return 0.0
    return 1.0 if normalized_gold in normalize_answer(prediction) else 0.0


def exact_match(prediction: str, gold: str) -> float:
    """Return 1.0 when the prediction and gold answer are equal after normalisation, else 0.0."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(gold) else 0.0


def _extract_option_letter(prediction: str) -> str | None:
    """Return the option letter A-D that the prediction chooses, or None when it names none.

    A letter after a cue word ("Answer: B", "option C") wins. Otherwise the first standalone
    capital letter A-D counts.

    NOTE: a sentence that starts with the article "A" and names no letter after a cue word
    ("A dog, so B") is read as option A.
    """
    cued = _CUED_OPTION_LETTER.search(prediction)
    if cued is not None:
        return cued.group(1)

    standalone = _OPTION_LETTER.search(prediction)
    if standalone is not None:
        return standalone.group(1)
    return None


def choice_match(prediction: str, gold: str) -> float:
    """Return 1.0 when the option letter chosen in the prediction equals the gold letter, else 0.0.

    The gold answer is a letter A-D, optionally in brackets or followed by a period ("A", "(B)", "C.").
    The prediction may state its choice as "A", "(A)", "A.", "Answer: A" or "option A".

    Raises:
        InvalidInputError: the gold answer does not start with an option letter A-D.

    NOTE: L-Eval's evaluation script (``process_output_mc``) takes the first character of the prediction
    that is one of "ABCD", even inside a word, so on free-form output it can pick another letter.
    """
    gold_letter = _GOLD_OPTION_LETTER.match(gold.strip())
    if gold_letter is None:
        raise InvalidInputError(
            f"invalid choice gold answer {gold!r}; expected an option letter A-D such as 'A' or '(B)'"
        )

    chosen = _extract_option_letter(prediction)
    return 1.0 if chosen == gold_letter.group(1).upper() else 0.0


# Registry


def _ignore_extra(function: Callable[[str, str], float]) -> MetricFunction:
    """Wrap a two-argument metric so that it accepts and ignores task-specific keyword arguments."""

    @functools.wraps(function)
    def metric(prediction: str, gold: str, **extra: object) -> float:
        return function(prediction, gold)

    return metric


def _classification_metric(prediction: str, gold: str, **extra: object) -> float:
    """Score with ``classification_score``, reading the class names from ``extra["all_classes"]``."""
    return classification_score(prediction, gold, extra.get("all_classes"))


METRICS: dict[str, MetricFunction] = {
    "qa_f1": _ignore_extra(qa_f1),
    "rouge_l": _ignore_extra(rouge_l),
    "classification": _classification_metric,
    "retrieval": _ignore_extra(retrieval_score),
    "count": _ignore_extra(count_score),
    "code_sim": _ignore_extra(code_sim),
    "contains": _ignore_extra(contains_answer),
    "exact_match": _ignore_extra(exact_match),
    "choice": _ignore_extra(choice_match),
}
"""Metric functions by name, each called as ``function(prediction, gold, **extra)``."""


def score_sample(metric: str, prediction: str, answers: Sequence[str], extra: dict | None = None) -> float:
    """Score a prediction against every gold answer with the named metric and return the maximum.

    ``extra`` contains the sample's task-specific fields. The metric receives them as keyword arguments,
    and ``extra["first_line"] = True`` cuts the prediction to its first line first (see
    ``prepare_prediction``).

    Raises:
        InvalidInputError: the metric name is unknown, or ``answers`` is a string or empty.
    """
    function = METRICS.get(metric)
    if function is None:
        raise InvalidInputError(f"unknown metric {metric!r}; choose one of {', '.join(sorted(METRICS))}")
    if isinstance(answers, str):
        raise InvalidInputError(
            f"invalid answers {answers!r}; pass a list of gold answers, not a string"
        )
    if not answers:
        raise InvalidInputError(f"missing gold answers for metric {metric!r}; pass at least one answer")

    extra = extra or {}
    prediction = prepare_prediction(prediction, first_line=bool(extra.get("first_line", False)))
    return max(function(prediction, gold, **extra) for gold in answers)

"""Tests of the scoring metrics against values worked out by hand in each test."""

from __future__ import annotations

import pytest

from gsa.errors import InvalidInputError
from gsa.eval.metrics import (
    LONGBENCH_FIRST_LINE_TASKS, LONGBENCH_METRICS, METRICS, choice_match, classification_score, code_sim,
    contains_answer, count_score, exact_match, normalize_answer, prepare_prediction, qa_f1, retrieval_score,
    rouge_l, score_sample,
)


# normalize_answer


def test_normalize_punctuation_and_articles():
    # "the cat, sat!" -> "the cat sat" -> " cat sat" -> "cat sat"
    assert normalize_answer("The Cat, sat!") == "cat sat"


def test_normalize_collapses_whitespace():
    assert normalize_answer("  An\tapple \n and a   pear ") == "apple and pear"


def test_normalize_keeps_article_inside_word():
    assert normalize_answer("Theory anthem") == "theory anthem"


def test_normalize_empty():
    assert normalize_answer("") == ""


# prepare_prediction


def test_prepare_first_line():
    assert prepare_prediction("\n\nParis\nQuestion: next", first_line=True) == "Paris"


def test_prepare_without_flag_unchanged():
    assert prepare_prediction("\nParis\nmore") == "\nParis\nmore"


# qa_f1


def test_qa_f1_identical():
    assert qa_f1("Paris.", "paris") == 1.0


def test_qa_f1_partial_overlap():
    # prediction tokens [big, red, dog], gold tokens [small, red, dog, barks]
    # overlap 2, precision 2/3, recall 2/4, F1 = 2 * (2/3) * (1/2) / (2/3 + 1/2) = 4/7 = 0.571
    assert qa_f1("the big red dog", "a small red dog barks") == pytest.approx(4 / 7)


def test_qa_f1_repeated_tokens():
    # overlap min(3, 1) = 1, precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert qa_f1("dog dog dog", "dog cat") == pytest.approx(0.4)


def test_qa_f1_empty_prediction():
    assert qa_f1("", "paris") == 0.0


def test_qa_f1_empty_gold():
    assert qa_f1("paris", "") == 0.0


def test_qa_f1_only_articles():
    # both sides normalise to no tokens, and LongBench scores no overlap as 0
    assert qa_f1("the", "a") == 0.0


def test_qa_f1_no_overlap():
    assert qa_f1("london", "paris") == 0.0


# rouge_l


def test_rouge_l_identical_ignores_case():
    assert rouge_l("The cat sat", "the cat sat") == 1.0


def test_rouge_l_partial():
    # prediction 5 tokens, gold 6 tokens, LCS "the cat on mat" = 4
    # precision 4/5, recall 4/6, F = 2 * (4/5) * (2/3) / (4/5 + 2/3) = (16/15) / (22/15) = 8/11
    assert rouge_l("the cat sat on mat", "the cat lay on the mat") == pytest.approx(8 / 11)


def test_rouge_l_order_matters():
    # LCS of [b, a] and [a, b] is 1, precision 1/2, recall 1/2, F = 0.5
    assert rouge_l("b a", "a b") == pytest.approx(0.5)


def test_rouge_l_repeated_tokens():
    # LCS of [a, a, a] and [a, b] is 1, precision 1/3, recall 1/2, F = 2 * (1/6) / (5/6) = 0.4
    assert rouge_l("a a a", "a b") == pytest.approx(0.4)


def test_rouge_l_punctuation_stays_on_token():
    # whitespace tokens: "cat." differs from "cat", so the LCS is 0
    assert rouge_l("cat.", "cat") == 0.0


def test_rouge_l_empty_prediction():
    assert rouge_l("", "the cat") == 0.0


def test_rouge_l_empty_gold():
    assert rouge_l("the cat", "") == 0.0


# classification_score

CLASSES = ["Loc", "Location", "Person"]


def test_classification_drops_substring_of_gold():
    # matches [Loc, Location], "Loc" is inside the gold "Location" so it is dropped, 1/1 = 1.0
    assert classification_score("It is a Location", "Location", CLASSES) == 1.0


def test_classification_two_matches():
    # matches [Loc, Location, Person], drop "Loc", remaining 2 with the gold among them, 1/2
    assert classification_score("Location or Person", "Location", CLASSES) == 0.5


def test_classification_shorter_gold_class():
    # gold "Loc": matches [Loc, Location], "Location" is not inside "Loc" so both stay, 1/2
    assert classification_score("Location", "Loc", CLASSES) == 0.5


def test_classification_drops_consecutive_substrings():
    # matches [L, Lo, Location], both "L" and "Lo" are inside the gold and dropped, 1/1 = 1.0
    assert classification_score("Location", "Location", ["L", "Lo", "Location"]) == 1.0


def test_classification_gold_missing():
    assert classification_score("Person", "Location", CLASSES) == 0.0


def test_classification_empty_prediction():
    assert classification_score("", "Location", CLASSES) == 0.0


def test_classification_requires_classes():
    with pytest.raises(InvalidInputError, match="all_classes"):
        classification_score("Location", "Location", None)


# retrieval_score


def test_retrieval_exact():
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0


def test_retrieval_several_numbers():
    # numbers [3, 12, 12], two equal the gold 12, score 2/3
    assert retrieval_score("Paragraph 3 or Paragraph 12, surely 12", "Paragraph 12") == pytest.approx(2 / 3)


def test_retrieval_wrong_number():
    # "112" is one number that differs from 12, score 0/1
    assert retrieval_score("Paragraph 112", "Paragraph 12") == 0.0


def test_retrieval_no_numbers():
    assert retrieval_score("I do not know", "Paragraph 12") == 0.0


def test_retrieval_empty_prediction():
    assert retrieval_score("", "Paragraph 12") == 0.0


def test_retrieval_gold_plain_number():
    assert retrieval_score("Paragraph 7", "7") == 1.0


def test_retrieval_gold_without_number():
    with pytest.raises(InvalidInputError, match="Paragraph 12"):
        retrieval_score("Paragraph 1", "Paragraph")


# count_score


def test_count_exact():
    assert count_score("There are 5 unique paragraphs", "5") == 1.0


def test_count_several_numbers():
    # numbers [4, 5, 5], two equal the gold 5, score 2/3
    assert count_score("I count 4, maybe 5 or 5", "5") == pytest.approx(2 / 3)


def test_count_no_numbers():
    assert count_score("several", "5") == 0.0


def test_count_gold_not_number():
    with pytest.raises(InvalidInputError, match="whole number"):
        count_score("5", "five")


# code_sim


def test_code_sim_identical():
    assert code_sim("x = 1", "x = 1") == 1.0


def test_code_sim_classic_levenshtein():
    # kitten -> sitting: 2 substitutions and 1 insertion, distance 3, longer length 7, 1 - 3/7 = 4/7
    assert code_sim("kitten", "sitting") == pytest.approx(4 / 7)


def test_code_sim_skips_fence_and_comment():
    # first code line "x = 10", distance to "x = 1" is 1 deletion, longer length 6, 1 - 1/6 = 5/6
    prediction = "```python\n# set up\nx = 10\n```"
    assert code_sim(prediction, "x = 1") == pytest.approx(5 / 6)


def test_code_sim_skips_slash_comment():
    # first code line "int y = 2;", 1 substitution against "int y = 3;", longer length 10, 1 - 1/10 = 0.9
    assert code_sim("// note\nint y = 2;", "int y = 3;") == pytest.approx(0.9)


def test_code_sim_skips_empty_lines():
    assert code_sim("\n\n   \n    return x\n", "    return x") == 1.0


def test_code_sim_skips_indented_comment():
    assert code_sim("    # done\n    return x", "    return x") == 1.0


def test_code_sim_only_comments():
    # no code line, so "" against "abc": distance 3, longer length 3, 1 - 3/3 = 0
    assert code_sim("# only a comment\n```", "abc") == 0.0


def test_code_sim_empty_prediction():
    assert code_sim("", "abc") == 0.0


def test_code_sim_empty_gold():
    # distance 4 from "abcd" to "", longer length 4, 1 - 4/4 = 0
    assert code_sim("abcd", "") == 0.0


# contains_answer


def test_contains_after_normalisation():
    # prediction "it was eiffel tower in paris" contains gold "eiffel tower"
    assert contains_answer("It was The Eiffel Tower, in Paris.", "the Eiffel tower") == 1.0


def test_contains_missing():
    assert contains_answer("It was in London.", "Paris") == 0.0


def test_contains_empty_prediction():
    assert contains_answer("", "Paris") == 0.0


def test_contains_empty_gold():
    assert contains_answer("Paris", "") == 0.0


# exact_match


def test_exact_match_after_normalisation():
    assert exact_match("The Answer!", "answer") == 1.0


def test_exact_match_extra_token():
    assert exact_match("answer yes", "answer") == 0.0


def test_exact_match_empty_prediction():
    assert exact_match("", "answer") == 0.0


# choice_match


def test_choice_bare_letter():
    assert choice_match("A", "A") == 1.0


def test_choice_bracketed_prediction():
    assert choice_match("(B)", "B") == 1.0


def test_choice_letter_with_period():
    assert choice_match("C. Because the text says so.", "(C)") == 1.0


def test_choice_answer_cue():
    assert choice_match("Answer: D", "D") == 1.0


def test_choice_option_cue():
    assert choice_match("I would pick option B", "B") == 1.0


def test_choice_cue_beats_article():
    # the article "A" comes first, but "answer is B" names the choice
    assert choice_match("A good answer is B", "B") == 1.0


def test_choice_bracketed_cue():
    assert choice_match("The answer is (A), not B", "B") == 0.0


def test_choice_first_letter_wins():
    assert choice_match("B or maybe C", "C") == 0.0


def test_choice_letter_inside_word():
    # the B in "Because" is part of a word, so no option is named
    assert choice_match("Because", "B") == 0.0


def test_choice_no_letter():
    assert choice_match("I do not know", "A") == 0.0


def test_choice_empty_prediction():
    assert choice_match("", "A") == 0.0


def test_choice_lowercase_gold():
    assert choice_match("B", "b") == 1.0


def test_choice_invalid_gold():
    with pytest.raises(InvalidInputError, match="option letter"):
        choice_match("A", "Paris")


# score_sample


def test_score_sample_max_over_answers():
    # "blue cat" scores 0; "red": overlap 1, precision 1/2, recall 1/1, F1 = 2 * (1/2) / (3/2) = 2/3
    assert score_sample("qa_f1", "red dog", ["blue cat", "red"], {}) == pytest.approx(2 / 3)


def test_score_sample_passes_classes():
    extra = {"all_classes": ["Person", "Location"]}
    assert score_sample("classification", "Person", ["Person"], extra) == 1.0


def test_score_sample_ignores_unused_extra():
    assert score_sample("exact_match", "x", ["x"], {"depth": 0.5, "length": 1000}) == 1.0


def test_score_sample_first_line():
    assert score_sample("qa_f1", "\nParis\nQuestion: next", ["Paris"], {"first_line": True}) == 1.0


def test_score_sample_without_first_line():
    # tokens [paris, question, next] against [paris]: precision 1/3, recall 1, F1 = 2 * (1/3) / (4/3) = 0.5
    assert score_sample("qa_f1", "\nParis\nQuestion: next", ["Paris"], {}) == pytest.approx(0.5)


def test_score_sample_unknown_metric():
    with pytest.raises(InvalidInputError, match="qa_f1"):
        score_sample("bleu", "x", ["x"], {})


def test_score_sample_empty_answers():
    with pytest.raises(InvalidInputError, match="missing gold answers"):
        score_sample("qa_f1", "x", [], {})


def test_score_sample_string_answers():
    with pytest.raises(InvalidInputError, match="list of gold answers"):
        score_sample("qa_f1", "x", "x", {})


# registries


def test_metrics_names():
    expected = {
        "qa_f1", "rouge_l", "classification", "retrieval", "count", "code_sim", "contains", "exact_match", "choice",
    }
    assert set(METRICS) == expected


def test_longbench_metrics_registered():
    assert set(LONGBENCH_METRICS.values()) <= set(METRICS)


def test_longbench_task_metrics():
    assert LONGBENCH_METRICS["passage_retrieval_en"] == "retrieval"
    assert LONGBENCH_METRICS["gov_report"] == "rouge_l"
    assert LONGBENCH_METRICS["lcc"] == "code_sim"
    assert LONGBENCH_METRICS["triviaqa"] == "qa_f1"


def test_longbench_first_line_tasks():
    assert "triviaqa" in LONGBENCH_FIRST_LINE_TASKS

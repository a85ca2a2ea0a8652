"""Eval prompts from raw documents: headings and short texts skipped, exact prefix/reference split."""

import pytest

from emo_trainer.evaluation.prompts import Prompt, build_prompts, is_heading


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_exact_split():
    (p,) = build_prompts([words(0, 12)], prompt_words=3, continuation_words=5)
    assert p == Prompt(prefix="w0 w1 w2", reference="w3 w4 w5 w6 w7")
    assert p.human_text == "w0 w1 w2 w3 w4 w5 w6 w7"


def test_wikitext_lines_headings_and_short_texts():
    docs = [
        " = Valkyria Chronicles III = ",
        "",
        " = = Gameplay = = ",
        " " + words(0, 7) + " ",  # exactly prefix + continuation: kept
        words(100, 6),  # one word short: skipped
        "   ",
        "# A markdown title",
        words(200, 30),
    ]
    prompts = build_prompts(docs, prompt_words=2, continuation_words=5)
    assert prompts == [
        Prompt("w0 w1", "w2 w3 w4 w5 w6"),
        Prompt("w200 w201", "w202 w203 w204 w205 w206"),
    ]


def test_multiline_document_drops_heading_lines_and_joins():
    doc = f"= Title =\n{words(0, 2)}\n\n = = Section = = \n{words(2, 4)}\n"
    (p,) = build_prompts([doc], prompt_words=3, continuation_words=3)
    assert p == Prompt("w0 w1 w2", "w3 w4 w5")


def test_num_prompts_and_determinism():
    docs = [words(10 * i, 10) for i in range(20)]
    a = build_prompts(docs, 2, 3, num_prompts=5)
    assert len(a) == 5 and a[0].prefix == "w0 w1" and a[4].prefix == "w40 w41"
    assert a == build_prompts(docs, 2, 3, num_prompts=5)
    assert len(build_prompts(docs, 2, 3)) == 20
    assert build_prompts([], 2, 3) == []


def test_heading_detection():
    assert is_heading(" = Robert Boulter = ")
    assert is_heading(" = = = 2006 – present = = = ")
    assert is_heading("## Usage")
    assert not is_heading("x = 3 is an assignment")
    assert not is_heading("The equation a = b holds =")
    assert not is_heading("#hashtag without a space")


def test_with_continuation_spacing():
    p = Prompt("Anna walked", "to the mill")
    assert p.with_continuation(" to the river") == "Anna walked to the river"
    assert p.with_continuation("to the river") == "Anna walked to the river"
    assert p.with_continuation("") == "Anna walked"


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_prompts(["a b c"], prompt_words=0)
    with pytest.raises(TypeError):
        build_prompts([{"text": "a"}], 1, 1)

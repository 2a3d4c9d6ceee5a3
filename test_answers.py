"""Tests of answers.py's multiple-choice reading against lmms-eval 0.7.3, on a corpus of 372 realistic
replies (test_answers_corpus.json: the reply, its options, the letter a careful reader takes from it,
and what lmms-eval 0.7.3's own extraction returned, recorded by running it). With lmms-eval itself at
hand (LMMS_EVAL_PATH = an unzipped lmms_eval-0.7.3 wheel: `pip download --no-deps lmms-eval==0.7.3`
then unzip), its function is run again here, its heavy imports stubbed; without it that test skips and
the recorded outputs still check everything else."""
import importlib
import json
import os
import sys
import types
from collections import Counter

import pytest

from answers import extract_choice, extract_lmms

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "test_answers_corpus.json"), encoding="utf-8") as f:
    CORPUS = json.load(f)


def test_the_corpus_covers_what_lmms_eval_gets_right_and_wrong():
    kinds = Counter(row["kind"] for row in CORPUS)
    assert len(CORPUS) == 372 and len(kinds) >= 25
    lmms_right = sum((row["lmms_eval_0_7_3"] or None) == row["intended"] for row in CORPUS)
    assert lmms_right == 260                              # lmms-eval misreads 112 of the 372


def test_extract_lmms_is_lmms_eval_0_7_3_on_every_reply():
    differ = [(row["reply"], extract_lmms(row["reply"]), row["lmms_eval_0_7_3"]) for row in CORPUS
              if extract_lmms(row["reply"]) != row["lmms_eval_0_7_3"]]
    assert not differ
    assert all(extract_choice(row["reply"], row["options"], mode="lmms") == (row["lmms_eval_0_7_3"] or None)
               for row in CORPUS)


def test_the_project_reading_agrees_with_lmms_eval_where_lmms_eval_is_right():
    agree = [row for row in CORPUS if (row["lmms_eval_0_7_3"] or None) == row["intended"]]
    wrong = [(row["reply"], extract_choice(row["reply"], row["options"])) for row in agree
             if extract_choice(row["reply"], row["options"]) != row["intended"]]
    assert len(agree) == 260 and not wrong


@pytest.mark.parametrize("kind", ["article_A", "article_A_no_answer", "lowercase", "option_text", "multi_letter",
                                  "refusal", "negation", "caps_option_text", "multi_letter_resolved", "long_no_letter"])
def test_the_project_reading_stays_right_where_lmms_eval_is_wrong(kind):
    rows = [row for row in CORPUS if row["kind"] == kind]
    assert rows and any((row["lmms_eval_0_7_3"] or None) != row["intended"] for row in rows)
    wrong = [(row["reply"], extract_choice(row["reply"], row["options"]), row["intended"]) for row in rows
             if extract_choice(row["reply"], row["options"]) != row["intended"]]
    assert not wrong


def test_the_project_reading_is_the_careful_readers_on_the_whole_corpus():
    wrong = [(row["reply"], extract_choice(row["reply"], row["options"]), row["intended"]) for row in CORPUS
             if extract_choice(row["reply"], row["options"]) != row["intended"]]
    assert not wrong


def test_against_lmms_eval_itself(monkeypatch):
    path = os.environ.get("LMMS_EVAL_PATH", "")
    if not os.path.isdir(os.path.join(path, "lmms_eval", "tasks", "videomme")):
        pytest.skip("lmms-eval 0.7.3 not unzipped at LMMS_EVAL_PATH (the recorded outputs are checked above)")
    pytest.importorskip("yaml")
    # its function without its dependencies: lmms_eval.tasks / .api as bare packages (their __init__
    # would import the world), cv2 / datasets / loguru stubbed; numpy and yaml real
    monkeypatch.syspath_prepend(path)
    for name in ("cv2", "datasets", "loguru"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["datasets"].Dataset = object               # only a type annotation there
    sys.modules["loguru"].logger = types.SimpleNamespace(**{name: (lambda *a, **k: None)
                                                           for name in ("info", "warning", "debug", "error")})
    for package in ("tasks", "api"):
        module = types.ModuleType(f"lmms_eval.{package}")
        module.__path__ = [os.path.join(path, "lmms_eval", package)]
        monkeypatch.setitem(sys.modules, f"lmms_eval.{package}", module)
    extract = importlib.import_module("lmms_eval.tasks.videomme.utils").extract_characters_regex
    for row in CORPUS:
        assert extract(row["reply"]) == row["lmms_eval_0_7_3"] == extract_lmms(row["reply"]), row["reply"]

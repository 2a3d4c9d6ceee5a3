"""
How a reply is read: the answer normaliser and the one multiple-choice letter extractor, used by the
Oracles (oracle.py), the evaluations (eval.py) and the trainer's sample accuracy alike.

    normalize_answer("The Red.") -> "red"            token_f1("red square", "red") -> 0.67
    extract_choice("I think it's (B) a dog", ["a cat", "a dog"]) -> "B"
"""
import re
from collections import Counter

from data import LETTERS

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
                     "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100"})
MC_UNANSWERED_WORDS = 10       # Video-MME: more words than this and no letter = unanswered
# Lead-ins stripped before the letter is read (Video-MME's list, plus the hedges small models add).
# Stripped repeatedly from the start, longest first, so "I think the answer is B" -> "B".
MC_LEAD_INS = sorted([
    "the best answer is", "the correct answer is", "the right answer is", "the final answer is",
    "the answer is", "the answer", "the best option is", "the correct option is", "the option is",
    "best answer:", "best option:", "correct answer:", "final answer:", "answer:", "option:",
    "my answer is", "i think", "i believe", "i'd say", "i would say", "it's", "it is", "that's",
    "that is", "so", "well"], key=len, reverse=True)


def normalize_answer(text):
    """str -> str: lowercase, no punctuation, no articles, number words as digits, single spaces.
    "The Red." -> "red";  "Two" -> "2";  "an apple, two pears" -> "apple 2 pears"."""
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)       # 1,000 -> 1000
    text = text.replace("'", "").replace("\u2019", "")   # don't -> dont (not "don t")
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", text)  # punctuation -> space, but keep 3.5
    tokens = [NUMBER_WORDS.get(t, t) for t in text.replace("_", " ").split() if t not in ARTICLES]
    return " ".join(tokens)


def token_f1(prediction, reference):
    """Token-overlap F1 of two normalised strings, in [0, 1] (SQuAD style)."""
    pred, ref = prediction.split(), reference.split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _letter_in(response, options):
    """The option letter a reply picks, read as it stands (extract_choice strips lead-ins first).
    Accepts a bare letter ("B", "(B)", "B)", "B.", a lone lowercase "b"), a letter opening the reply
    with punctuation ("B. cat", "(C) dog"), a letter after a lead-in ("The answer is B",
    "Answer: (B) cat", "I think the best option is B", "the answer is b" at the end of the reply)
    and the exact text of an option ("cat" when option B is "cat"). Only an uppercase letter counts
    inside running text, so the article in "a dog is running" is not mistaken for option A."""
    letters = LETTERS[:len(options)]
    text = response.strip()
    if not text or not letters:
        return None
    bare = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?[.):]?", text)
    if bare and bare.group(1).upper() in letters:
        return bare.group(1).upper()
    # a letter in parentheses, or an uppercase one followed by punctuation, opening the reply
    opening = re.match(rf"\(([{letters}{letters.lower()}])\)|([{letters}])[.):,;]", text)
    if opening:
        return (opening.group(1) or opening.group(2)).upper()
    lead = r"(?i:\b(?:answer|option|choice)\s*(?:is|:)?\s*)"     # "The (best) answer is", "Answer:"
    after_lead = re.search(lead + rf"\(?([{letters}])\)?(?:[.):,;]|\s|$)", text)   # uppercase letter
    if after_lead:
        return after_lead.group(1)
    # a lowercase letter only where it ends the reply ("the answer is b"; not "the answer is a dog")
    after_lead = re.search(lead + rf"\(?([{letters.lower()}])\)?[.)]?\s*$", text)
    if after_lead:
        return after_lead.group(1).upper()
    # the text of an option, possibly after a lead-in ("The answer is a dog.")
    norm = normalize_answer(re.sub(r"^(?i:(?:the\s+)?(?:best\s+|correct\s+|final\s+)?"
                                   r"(?:answer|option|choice)\s*(?:is|:)\s*)", "", text))
    for i, option in enumerate(options):
        if norm and norm == normalize_answer(option):
            return letters[i]
    return None


def strip_lead_in(reply):
    """str -> str without lead-ins: "I think it's A." -> "A.", "The best answer is (B) cat" -> "(B) cat"."""
    text = reply.strip()
    while True:
        low = text.lower()
        for lead in MC_LEAD_INS:
            # whole words only: "so" must not eat the start of "some"
            if low.startswith(lead) and (len(low) == len(lead) or not low[len(lead)].isalnum()):
                text = text[len(lead):].lstrip(" \t\n:,-")
                break
        else:
            return text


def extract_choice(reply, options):
    """The option letter a multiple-choice reply picks, or None: the one extractor of the project
    (Reference/Graded Oracle, eval.py's Video-MME scoring, the trainer's sample accuracy). The
    lead-in is stripped first ("I think it's B." -> "B."), as Video-MME's scorer does; then
    _letter_in reads the rest, or the whole reply; right after a stripped lead-in an uppercase
    letter opening the rest answers too ("It's B because ...")."""
    text = strip_lead_in(reply)
    letter = _letter_in(text, options) or _letter_in(reply, options)
    if letter is None and text != reply.strip():
        after = re.match(rf"\(?([{LETTERS[:len(options)]}])\)?(?:\s|$)", text)
        letter = after.group(1) if after else None
    return letter


def is_unanswered(reply):
    """Video-MME: a reply with no letter and more than MC_UNANSWERED_WORDS words after its lead-in
    is unanswered (wrong, and counted)."""
    return len(strip_lead_in(reply).split()) > MC_UNANSWERED_WORDS

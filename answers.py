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
EXTRACTORS = ("project", "lmms")
# Phrases that announce the answer; a letter right after one is the answer (the last one wins, so a
# reply that corrects itself is read as corrected). English and the languages judges and models use.
ANNOUNCE = (r"(?:(?:the|my|your|our)\s+)?(?:(?:best|correct|right|final|most\s+likely|only)\s+)?"
            r"(?:answer|choice|option|one)\s*(?:is|would\s+be|will\s+be|should\s+be|must\s+be|:|-|–|—)"
            r"|answer\s*(?=\n)|i\s*(?:would\s+|'d\s+|will\s+)?(?:choose|select|pick|go\s+with)(?:\s+option)?"
            r"|it'?s|it\s+is|that'?s|that\s+is|(?:no,?\s+)?wait,"
            r"|la\s+respuesta(?:\s+correcta)?\s+es|die(?:\s+richtige)?\s+antwort\s+ist|la\s+r[ée]ponse(?:\s+correcte)?\s+est"
            r"|la\s+risposta(?:\s+corretta)?\s+[èe]|a\s+resposta(?:\s+correta)?\s+[ée]|jawabannya\s+adalah|odpowied[źz]\s*:"
            r"|(?:правильный\s+)?ответ|正确答案是|答案是|答案为|答案|答え?は|正解は|选|정답은|답은")
# Lead-ins stripped from the start of a reply before it is read whole ("I think it's B." -> "B.").
LEAD_IN = re.compile(r"^(?:(?:i\s+think|i\s+believe|i'?d\s+say|i\s+would\s+say|so|well|definitely|probably|"
                     r"based\s+on\s+the\s+(?:video|frames|footage)|from\s+the\s+video|according\s+to\s+the\s+video|"
                     r"(?:the\s+)?(?:answer|option|choice)(?!\w)|" + ANNOUNCE + r")\s*[:,\-–—]*\s*)+", re.I)
# After an uppercase "A", these words make it a letter ("A is correct", "A or B"); any other lower-case
# word makes it the article ("A dog is sleeping").
AFTER_A = {"is", "or", "and", "because", "as", "since", "seems", "looks", "was", "would", "could", "might",
           "nor", "but", "if", "fits", "matches"}
STOPWORDS = {"it", "is", "he", "she", "they", "there", "are", "was", "in", "on", "at", "of", "to", "and", "that", "this"}
# lmms-eval 0.7.3's answer phrases (tasks/_task_utils/mcq_extract.py), for extract="lmms"
LMMS_PHRASES = ["the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは"]
LMMS_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                 "space": 2, "fallback": 0}


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


def _clean(reply):
    """The reply without reasoning blocks, markup and decoration: what a reader looks at."""
    text = reply.split("</think>")[-1] if "</think>" in reply else reply
    text = re.sub(r"</?\w+>", " ", text)                              # <answer>B</answer>, </s>
    text = re.sub(r"[*`#>✅→]|^\s*[-•]\s", " ", text, flags=re.M)     # markdown, bullets, arrows
    return text.strip().strip("'\"").strip()


def _letter_at(text, start, letters, options):
    """The option letter standing at text[start:] ("B", "(b)", "[C]", "D.", "d) at the end"), or None.
    Upper case, unless it is the article ("A dog", "A woman is cooking"); lower case where nothing follows
    ("the answer is b", "c.", "(d)") or where its option's text does ("b) at the beach"), so neither "the
    answer is a dog" nor "b. a horse" (option B is "a dog") reads as a letter."""
    match = re.match(r"([(\[\"'])?\s*([A-Za-z])(?![A-Za-z0-9])", text[start:])
    if not match or match.group(2).upper() not in letters:
        return None
    letter, rest = match.group(2), text[start + match.end():]
    closed = bool(match.group(1)) or rest[:1] == ")"
    marked = closed or rest[:1] in (".", ":", ",", ";", "!", "-", "–", "—")
    after = rest[1:].strip() if marked else rest.strip()
    if letter.islower():
        if not after or not after[0].isalnum():
            return letter.upper() if marked or not after else None
        said = _option_match(after, [options[letters.index(letter.upper())]])
        return letter.upper() if marked and said == 0 else None
    word = re.match(r"\s+(\S+)", rest)
    if letter == "A" and not marked and word and word.group(1)[:1].islower():
        return letter if word.group(1).strip(".,;:!?").lower() in AFTER_A else None
    return letter


def _negated(text, letters):
    return {m.group(1) for m in re.finditer(r"(?i:\bnot)\s+(?i:option\s+)?\(?([A-Z])\b", text) if m.group(1) in letters}


def _option_match(text, options):
    """The option whose text the reply is (or, in longer replies, the only one it names), else None."""
    said = normalize_answer(LEAD_IN.sub("", text))
    normalized = [normalize_answer(option) for option in options]
    exact = [i for i, option in enumerate(normalized) if said and said == option]
    if len(exact) == 1:
        return exact[0]
    words = set(said.split()) - STOPWORDS
    contents = [set(option.split()) - STOPWORDS for option in normalized]
    named = [i for i, content in enumerate(contents) if content and content <= words]              # reply names it
    within = [i for i, content in enumerate(contents) if words and words <= content]               # reply is part of it
    for found in (named, within):
        if len(found) == 1:
            return found[0]
    return None


def extract_choice(reply, options, mode="project"):
    """The option letter a multiple-choice reply picks, or None: the one extractor of the project
    (Reference/Graded Oracle, eval.py's Video-MME scoring, the trainer's sample accuracy).
    mode="lmms": lmms-eval 0.7.3's reading, exactly (extract_lmms), for leaderboard-comparable numbers.
    mode="project" reads as a careful reader would, in this order:
      1. a letter announced by an answer phrase ("the correct answer is B", "I choose (C)", "答案是A",
         "Answer:\nD"); the last announcement wins, a negated letter ("not C") never does;
      2. the reply, lead-in stripped, opening with a letter: "B", "(b)", "C. a cat", "D because ...";
         "A dog ..." is the article, and "A or B" / "B, C" are two letters: no answer;
      3. a line holding just a letter (or a letter and its option);
      4. the one upper-case letter standing alone in the reply ("Based on the video, B.");
      5. the option whose text the reply is, or the only one it names ("a dog", "It's RNA.").
    It agrees with lmms-eval wherever lmms-eval reads the intended letter, and differs where it does
    not: lower-case letters, option text, the article "A", letters inside words ("ATP"), hedges
    between letters and refusals ("N/A", "Could you...")."""
    if mode == "lmms":
        return extract_lmms(reply, LETTERS[:len(options)]) or None
    letters = LETTERS[:len(options)]
    text = _clean(reply)
    if not text or not letters:
        return None
    negated = _negated(text, letters)
    announced = []                                                 # (position, letter)
    for match in re.finditer(rf"(?<![^\W\d_])(?:{ANNOUNCE})", text, re.I):   # not inside a Latin word
        start = match.end() + len(re.match(r"[\s:：\-–—\"'=]*", text[match.end():]).group(0))
        announced.append((start, _letter_at(text, start, letters, options)))
    for match in re.finditer(rf"(?<![\w/])\(?([{letters}])\)?\s+is\s+(?:the\s+)?(?:correct|right|best)\b", text):
        announced.append((match.start(1), match.group(1)))        # "C is correct", "A is the correct answer"
    announced = [letter for _, letter in sorted(announced) if letter and letter not in negated]
    if announced:
        return announced[-1]
    body = LEAD_IN.sub("", text).strip() or text
    opening = _letter_at(body, 0, letters, options)
    if opening and opening not in negated:
        if re.match(rf"^\W?\s*{opening}\W?\s*(?:,|/|&|\bor\b|\band\b)\s*\(?[{letters}]\b", body, re.I):
            return None                                              # "A or B", "B, C", "A/B": a hedge
        if not re.match(rf"^\W?\s*{opening}\s*\?", body, re.I):      # "B? No wait, C." is not an answer
            return opening
    lines = [line for line in text.splitlines()[1:] if line.strip()]
    on_lines = [_letter_at(line.strip(), 0, letters, options) for line in lines if re.match(r"^\W?\s*[A-Za-z]\W?\s*(?:\W|$)", line.strip())]
    on_lines = [letter for letter in on_lines if letter and letter not in negated]
    if on_lines:
        return on_lines[-1]
    alone = {m.group(1) for m in re.finditer(rf"(?<![\w/])([{letters}])(?![\w/])", text)
             if _letter_at(text, m.start(), letters, options)} - negated
    if alone:
        return alone.pop() if len(alone) == 1 else None
    index = _option_match(text, options)
    return letters[index] if index is not None else None


def extract_lmms(reply, letters="ABCD"):
    """lmms-eval 0.7.3's Video-MME answer extraction, reproduced from its description (the framework's
    default removal of <think>...</think> first, then extract_mcq_answer): case-sensitive upper-case
    letters, candidates by format, the highest-priority one (the later on a tie). -> letter or ""."""
    if "</think>" in reply:
        reply = reply.split("</think>")[-1]
    reply = re.sub(r"<think>.*?</think>", "", reply, flags=re.S).strip()
    if not reply.strip():
        return ""
    text = reply.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates = []
    for letter in letters:
        for pattern, kind in ((f"({letter})", "parentheses"), (f"{letter}.", "period"), (f"{letter}:", "colon"),
                              (f"{letter})", "right_paren"), (f"{letter} ", "space")):
            if pattern in text:
                candidates.append((letter, text.rfind(pattern), kind))
    lower = text.lower()
    for phrase in LMMS_PHRASES:
        at = lower.find(phrase)
        if at >= 0:
            for letter in letters:
                found = text.find(letter, at + len(phrase))
                if found >= 0:
                    candidates.append((letter, found, "phrase"))
    stripped = text.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((letter, 0, "start"))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((letter, len(text) - 1, "end"))
    if not candidates:
        candidates = [(letter, text.rfind(letter), "fallback") for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda c: (LMMS_PRIORITY[c[2]], c[1]))[0]



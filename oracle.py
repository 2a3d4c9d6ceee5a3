"""
Oracle rankers: who orders the G responses the policy sampled for one prompt (paper Sec. 3).

Oracle-RLAIF replaces a calibrated reward model by an Oracle that only has to *rank*
candidate answers. Every oracle here has the same two methods:

    oracle.rank(sample, responses) -> list[int]
        competition ranks of the G responses, 0 = best; identical responses share a rank
        (scores 9, 7, 7, 3 -> ranks 0, 1, 1, 3, via grpo_rank.ranks_from_scores).
        Failure raises OracleError with the reason: the trainer gives that group zero
        advantages and counts it; it never invents a ranking.
    oracle.rank_many(samples, groups, max_workers=8) -> list[list[int] | OracleError]
        the requests of a batch are independent, so they run concurrently; a failed group
        holds its OracleError in its slot instead of raising.

The oracles (make_oracle(name, **options) builds one from the trainer's config):
    "reference"     agreement with the dataset's reference answer (exact > partial > wrong)
    "graded"        like "reference", plus partial credit for near misses (counts, colours)
    "reward_model"  a sequence-classification reward model, or any score_fn(question, responses)
    "judge"         a judge LLM behind an OpenAI-compatible /v1/chat/completions endpoint

A sample is a dict {"id", "video", "question", "answer", optional "options", ...}; for
multiple choice the answer is a letter "A".."D" and "options" holds the option texts.

Check a judge endpoint before a long run:
    python oracle.py --oracle=judge --base_url=http://localhost:8000/v1 --model=NAME --input=groups.jsonl
where each input line is {"sample": {...}, "responses": [...]}; one JSON line comes out per input.
"""
import argparse
import ast
import base64
import email.utils
import functools
import http.client
import json
import logging
import math
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from grpo_rank import ranks_from_scores

log = logging.getLogger("oracle")

ORACLE_NAMES = ("reference", "graded", "reward_model", "judge")

# ---------------------------------------------------------------------------------------------
# answer normalisation (ReferenceOracle, GradedOracle)

ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
                     "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100"})
EXACT_SCORE = 2.0   # above any partial credit (token F1 <= 1), so an exact match always ranks first

# GradedOracle's colour table: neighbours on the colour wheel (and the greys) earn NEAR_COLOUR_SCORE.
# Deliberately small and symmetric; extend it for your own data.
COLOUR_NEIGHBOURS = [("red", "orange"), ("red", "pink"), ("red", "purple"), ("orange", "yellow"),
                     ("orange", "brown"), ("yellow", "green"), ("green", "blue"), ("green", "cyan"),
                     ("blue", "cyan"), ("blue", "purple"), ("purple", "pink"),
                     ("black", "gray"), ("gray", "white")]
COLOURS = {c for pair in COLOUR_NEIGHBOURS for c in pair}
COLOUR_ALIASES = {"grey": "gray", "violet": "purple"}
NEAR_COLOUR_SCORE = 0.5

# ---------------------------------------------------------------------------------------------
# the judge (JudgeOracle)

JUDGE_BASE_URL = "http://127.0.0.1:8000/v1"
JUDGE_TIMEOUT = 60.0        # seconds per HTTP request
JUDGE_MAX_RETRIES = 4       # retries after the first attempt
JUDGE_MAX_SECONDS = 300.0   # total time budget of one call, retries and waits included
JUDGE_BACKOFF = 1.0         # first retry delay; doubles each retry ...
JUDGE_BACKOFF_MAX = 30.0    # ... up to this
JUDGE_MAX_TOKENS = 256
RETRY_STATUS = {408, 409, 429}   # plus every 5xx; other 4xx (auth, bad request) fail at once
EMPTY_SHOWN = "(empty answer)"   # how an empty response is shown to the judge

RANK_SYSTEM = ("You are a careful, impartial judge of answers to questions about videos. "
               "You compare candidate answers and rank them from best to worst.")
ANSWER_SYSTEM = ("You are a careful, impartial judge of answers to questions about videos. "
                 "You compare a predicted answer with the correct answer and decide whether "
                 "the prediction is correct.")


class OracleError(Exception):
    """An oracle could not rank a group (the judge did not answer, a score was not finite, ...).
    The message says why; it never contains an API key."""


# ---------------------------------------------------------------------------------------------
# small helpers shared by the oracles

def ranks_of(scores):
    """list[float] (higher = better) -> list[int] competition ranks, 0 = best."""
    if not scores:
        return []
    return ranks_from_scores(torch.tensor([scores], dtype=torch.float32))[0].tolist()


def format_question(sample):
    """The question as an oracle should see it: for multiple choice, followed by the lettered options."""
    question = sample["question"].strip()
    options = sample.get("options")
    if options:
        question += "\n" + "\n".join(f"{chr(65 + i)}. {text}" for i, text in enumerate(options))
    return question


def run_many(jobs, max_workers=8):
    """Run zero-argument callables, each returning a ranking; an OracleError lands in its slot.
    max_workers <= 1 runs them in order in this thread. Any other exception is a bug and raises."""
    def call(job):
        try:
            return job()
        except OracleError as e:
            return e
    if max_workers <= 1 or len(jobs) <= 1:
        return [call(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(jobs))) as pool:
        return list(pool.map(call, jobs))


def rank_many(oracle, samples, groups, max_workers=8):
    """Rank many (sample, responses) groups concurrently.
    oracle: anything with .rank(sample, responses); samples: list[dict]; groups: list[list[str]]
    -> list[list[int] | OracleError], in input order."""
    if len(samples) != len(groups):
        raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
    jobs = [functools.partial(oracle.rank, s, g) for s, g in zip(samples, groups)]
    return run_many(jobs, max_workers)


# ---------------------------------------------------------------------------------------------
# reference answers

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


def extract_choice(response, options):
    """The option letter a multiple-choice response picks, or None.
    Accepts a bare letter ("B", "(B)", "B)", "B.", a lone lowercase "b"), a letter opening the reply
    with punctuation ("B. cat", "(C) dog"), a letter after a lead-in ("The answer is B",
    "Answer: (B) cat", "I think the best option is B", "the answer is b" at the end of the reply)
    and the exact text of an option ("cat" when option B is "cat"). Only an uppercase letter counts
    inside running text, so the article in "a dog is running" is not mistaken for option A."""
    letters = "".join(chr(65 + i) for i in range(len(options)))
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


def reference_letter(sample):
    """The correct letter of a multiple-choice sample (its answer, or the option its answer spells)."""
    answer = sample["answer"].strip()
    letter = extract_choice(answer, sample["options"])
    if letter is None:
        raise OracleError(f"sample {sample.get('id')!r}: answer {answer!r} names none of the options")
    return letter


class ReferenceOracle:
    """Ranks by agreement with the reference answer.

    Open-ended: after normalize_answer, exact match scores 2, partial overlap its token F1 in
    (0, 1], anything else 0, so all wrong answers tie. Multiple choice (sample has "options"):
    the chosen letter (extract_choice) scores 1 when correct, else 0. Empty responses are wrong.
    Pure CPU and fast: rank_many runs the groups one after the other."""

    def score(self, sample, responses):
        """sample: dict, responses: list[str] -> list[float], higher = better."""
        if sample.get("options"):
            correct = reference_letter(sample)
            return [1.0 if extract_choice(r, sample["options"]) == correct else 0.0 for r in responses]
        reference = normalize_answer(sample["answer"])
        return [self.score_open(normalize_answer(r), reference) for r in responses]

    def score_open(self, prediction, reference):
        """Score of one normalised open-ended prediction against the normalised reference."""
        if not prediction:
            return 0.0
        if prediction == reference:
            return EXACT_SCORE
        return token_f1(prediction, reference)

    def rank(self, sample, responses):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best."""
        return ranks_of(self.score(sample, responses))

    def rank_many(self, samples, groups, max_workers=8):
        return rank_many(self, samples, groups, max_workers=1)   # pure CPU: threads add nothing

    def __repr__(self):
        return f"{type(self).__name__}()"


def _numbers(normalized):
    return [float(t) for t in normalized.split() if re.fullmatch(r"\d+(?:\.\d+)?", t)]


def _colours(normalized):
    tokens = [COLOUR_ALIASES.get(t, t) for t in normalized.split()]
    return [t for t in tokens if t in COLOURS]


class GradedOracle(ReferenceOracle):
    """ReferenceOracle with partial credit for near misses, so wrong answers are ordered too.

    When the reference holds exactly one number (a count): a prediction whose first number is
    off by d != 0 scores 1 / (1 + d) (0.5, 0.33, 0.25, ...). When the reference holds exactly one
    colour: a prediction whose first colour neighbours it in COLOUR_NEIGHBOURS scores 0.5.
    A prediction keeps its token F1 when that is higher; an exact match still scores 2.
    Multiple choice is scored as in ReferenceOracle (a letter is right or wrong)."""

    def score_open(self, prediction, reference):
        score = super().score_open(prediction, reference)
        if score == EXACT_SCORE or not prediction:
            return score
        true_numbers, pred_numbers = _numbers(reference), _numbers(prediction)
        if len(true_numbers) == 1 and pred_numbers and pred_numbers[0] != true_numbers[0]:
            score = max(score, 1.0 / (1.0 + abs(pred_numbers[0] - true_numbers[0])))
        true_colours, pred_colours = _colours(reference), _colours(prediction)
        if len(true_colours) == 1 and pred_colours:
            pair = {true_colours[0], pred_colours[0]}
            if any(pair == set(p) for p in COLOUR_NEIGHBOURS):
                score = max(score, NEAR_COLOUR_SCORE)
        return score


# ---------------------------------------------------------------------------------------------
# reward model

class RewardModelOracle:
    """Ranks responses by a reward model's scalar score.

    path: a local directory (or hub name) of any AutoModelForSequenceClassification with
    num_labels=1 and its tokenizer; or score_fn: a callable (question: str, responses: list[str])
    -> list[float]. Identical responses are scored once; scoring is batched under torch.no_grad.
    A tokenizer with a chat template sees [user: question, assistant: response] (how chat RMs are
    trained); otherwise the (question, response) pair is encoded as a text pair.
    Non-finite scores raise OracleError."""

    def __init__(self, path=None, score_fn=None, device="cpu", dtype=None, batch_size=16, max_length=1024):
        if (path is None) == (score_fn is None):
            raise ValueError("RewardModelOracle needs exactly one of path= or score_fn=")
        self.path, self.score_fn = path, score_fn
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.model = self.tokenizer = None
        if path is not None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if self.tokenizer.pad_token is None:     # Llama-style tokenizers ship without one
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            kwargs = {"dtype": getattr(torch, dtype)} if isinstance(dtype, str) else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            if self.model.config.num_labels != 1:
                raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}, expected 1")
            # the model finds each sequence's last token by looking for the pad id: it must know it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model.to(self.device).eval()

    @torch.no_grad()
    def model_scores(self, question, responses):
        """question: str, responses: list[str] -> list[float], one forward per batch_size responses."""
        tok = self.tokenizer
        scores = []
        for start in range(0, len(responses), self.batch_size):
            chunk = responses[start:start + self.batch_size]
            if getattr(tok, "chat_template", None):
                texts = [tok.apply_chat_template([{"role": "user", "content": question},
                                                  {"role": "assistant", "content": r}], tokenize=False)
                         for r in chunk]
                batch = tok(texts, add_special_tokens=False, padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt")
            else:
                batch = tok([question] * len(chunk), chunk, padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            scores += self.model(**batch).logits[:, 0].float().cpu().tolist()
        return scores

    def score(self, sample, responses):
        """sample: dict, responses: list[str] -> list[float] (identical responses scored once)."""
        unique = list(dict.fromkeys(responses))
        question = format_question(sample)
        if self.score_fn is not None:
            try:
                unique_scores = [float(s) for s in self.score_fn(question, unique)]
            except Exception as e:   # a user's scorer (maybe remote) failing is an oracle failure
                raise OracleError(f"score_fn failed: {type(e).__name__}: {e}") from e
        else:
            unique_scores = self.model_scores(question, unique)
        if len(unique_scores) != len(unique):
            raise OracleError(f"reward model gave {len(unique_scores)} scores for {len(unique)} responses")
        if not all(math.isfinite(s) for s in unique_scores):
            raise OracleError(f"reward model gave non-finite scores {unique_scores}")
        by_text = dict(zip(unique, unique_scores))
        return [by_text[r] for r in responses]

    def rank(self, sample, responses):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best."""
        return ranks_of(self.score(sample, responses))

    def rank_many(self, samples, groups, max_workers=8):
        # a local model is one device: threads would only contend for it (and the tokenizer is not
        # thread-safe); a score_fn may be a remote call, which does gain from concurrency
        return rank_many(self, samples, groups, max_workers=1 if self.model is not None else max_workers)

    def __repr__(self):
        source = f"path={self.path!r}" if self.path is not None else f"score_fn={self.score_fn!r}"
        return f"RewardModelOracle({source}, device={str(self.device)!r})"


# ---------------------------------------------------------------------------------------------
# judge LLM over HTTP

def find_json(text, key=None):
    """The first JSON object in text (prose and ``` fences around it are fine), or None.
    key: the object must contain this key. Python-style dicts {'pred': 'yes'} are accepted too,
    as some judges (and the Video-ChatGPT prompt) produce them."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        start = match.start()
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            end = text.find("}", start)    # flat python dict literal
            try:
                value = ast.literal_eval(text[start:end + 1]) if end > 0 else None
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        if isinstance(value, dict) and (key is None or key in value):
            return value
    return None


def parse_ranking(text, n):
    """A judge reply -> list[int]: the ids 1..n best first. Raises ValueError when the reply has
    no {"ranking": [...]} object (a bare JSON list is accepted too) or is not a permutation of 1..n."""
    found = find_json(text, "ranking")
    if found is not None:
        ranking = found["ranking"]
    elif find_json(text) is not None:
        raise ValueError(f"JSON object without a 'ranking' key in reply {text[:200]!r}")
    else:   # no object at all: small judges often answer a bare list "[2, 1, 3]"
        ranking = None
        for candidate in re.findall(r"\[[^\[\]]*\]", text):
            try:
                ranking = json.loads(candidate)
                break
            except ValueError:
                continue
        if ranking is None:
            raise ValueError(f"no JSON ranking in reply {text[:200]!r}")
    if not isinstance(ranking, list):
        raise ValueError(f"ranking is not a list: {ranking!r}")
    ids = []
    for item in ranking:
        if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).strip().isdigit():
            raise ValueError(f"ranking holds a non-integer id {item!r}")
        ids.append(int(item))
    if len(ids) != n:
        raise ValueError(f"ranking has {len(ids)} ids, expected {n}")
    if sorted(ids) != list(range(1, n + 1)):
        raise ValueError(f"ranking {ids} is not a permutation of 1..{n}")
    return ids


def parse_verdict(text):
    """A judge reply -> {"pred": "yes"/"no", "score": float in [0, 5]}. Raises ValueError otherwise.
    The score is kept as given (4.8 stays 4.8: the original scripts truncated it with int())."""
    found = find_json(text, "pred")
    if found is None:
        raise ValueError(f"no {{'pred': ..., 'score': ...}} object in reply {text[:200]!r}")
    pred = str(found["pred"]).strip().lower()
    if pred not in ("yes", "no"):
        raise ValueError(f"pred is {found['pred']!r}, expected yes or no")
    try:
        score = float(found.get("score"))
    except (TypeError, ValueError):
        raise ValueError(f"score is {found.get('score')!r}, expected a number") from None
    if not 0.0 <= score <= 5.0:
        raise ValueError(f"score {score} outside [0, 5]")
    return {"pred": pred, "score": score}


def _retry_after(value):
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _scrub(text, secret):
    """Remove the secret from a message, should a server have echoed it back."""
    return text.replace(secret, "***") if secret else text


def chat(messages, base_url=JUDGE_BASE_URL, model=None, api_key_env="OPENAI_API_KEY",
         temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, timeout=JUDGE_TIMEOUT,
         max_retries=JUDGE_MAX_RETRIES, max_seconds=JUDGE_MAX_SECONDS, backoff=JUDGE_BACKOFF,
         backoff_max=JUDGE_BACKOFF_MAX, parse=None):
    """POST one chat completion to an OpenAI-compatible endpoint; the one HTTP client of this project.

    messages: list of {"role", "content"} dicts; parse: str -> value, raising ValueError when the
    reply is unusable (None returns the reply text). Retries, with exponential backoff (Retry-After
    honoured on 429), timeouts, connection errors, 408/409/429/5xx and replies parse rejects; at
    most max_retries retries and max_seconds in all. Then raises OracleError with the last reason.
    The API key is read from the environment variable api_key_env at each request (absent is fine
    for local servers) and never enters a log record, an exception or the object it was called on."""
    url = base_url.rstrip("/")
    if not urllib.parse.urlsplit(url).path:     # "http://host:port" -> the conventional /v1 root
        url += "/v1"
    url += "/chat/completions"
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    data = json.dumps(body).encode()
    start = time.monotonic()
    deadline = start + max_seconds
    delay, reason, attempts = backoff, "no attempt made", 0
    while True:
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        attempts += 1
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        wait = None   # a server-requested wait (Retry-After)
        try:
            log.debug("POST %s model=%s attempt=%d", url, model, attempts)
            with urllib.request.urlopen(request, timeout=min(timeout, remaining)) as response:
                raw = response.read()
            try:
                text = json.loads(raw)["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError(f"content is {type(text).__name__}")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"malformed completion ({type(e).__name__}: {e}): {raw[:200]!r}") from None
            return text if parse is None else parse(text)
        except urllib.error.HTTPError as e:
            # build the message ourselves from the status and a little of the body; the error
            # object itself (response headers, open socket) goes no further
            try:
                detail = e.read(300).decode("utf-8", "replace")
            except Exception:
                detail = ""
            reason = _scrub(f"HTTP {e.code} from {url}: {detail.strip()}", key)
            if e.code not in RETRY_STATUS and e.code < 500:
                break                                   # auth / bad request / no such model: final
            wait = _retry_after(e.headers.get("Retry-After"))   # 429 and 503 may say how long
        except (TimeoutError, socket.timeout):
            reason = f"timeout after {min(timeout, remaining):.3g} s from {url}"
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "connection error"
            reason = _scrub(f"{kind} for {url}: {type(e.reason).__name__}: {e.reason}", key)
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            reason = _scrub(f"connection error for {url}: {type(e).__name__}: {e}", key)
        except ValueError as e:   # malformed completion, or parse rejected the reply
            reason = _scrub(f"invalid reply: {e}", key)
        if attempts > max_retries:
            break
        sleep = max(delay, wait or 0.0)
        if time.monotonic() + sleep >= deadline:
            reason += f" (next retry in {sleep:.3g} s would pass max_seconds={max_seconds})"
            break
        log.warning("judge attempt %d failed, retrying in %.3g s: %s", attempts, sleep, reason)
        time.sleep(sleep)
        delay = min(delay * 2, backoff_max)
    # raised outside any except block, so the error carries no urllib exception as its context
    raise OracleError(f"judge failed after {attempts} attempt(s) in {time.monotonic() - start:.1f} s: {reason}")


def encode_png(image):
    """uint8 (H, W, 3) tensor -> PNG bytes (zlib + struct, no imaging library)."""
    height, width, _ = image.shape
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8),           # filter byte 0 per row
                      image.contiguous().reshape(height, width * 3)], dim=1)

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)) + chunk(b"IEND", b""))


def video_frames_png(path, num_frames, max_side):
    """num_frames frames of a video as base64 PNG data URLs, the longer side at most max_side px."""
    import data   # lazily: only judges that look at frames need the video stack
    try:
        frames = data.load_video(path, num_frames)   # (T, H, W, 3) uint8
    except data.VideoError as e:
        raise OracleError(f"cannot read frames of {path}: {e}") from e
    height, width = frames.shape[1:3]
    if max(height, width) > max_side:
        scale = max_side / max(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=size,
                                                 mode="bilinear", antialias=True, align_corners=False)
        frames = frames.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return ["data:image/png;base64," + base64.b64encode(encode_png(f)).decode() for f in frames]


class JudgeOracle:
    """A judge LLM behind an OpenAI-compatible /v1/chat/completions endpoint (vLLM, Ollama, OpenAI).

    The judge sees the question (with its options), the reference answer when there is one, and
    the distinct responses numbered [1]..[n] in a shuffled order (judges favour early positions;
    the shuffle uses random.Random(seed, call number), so a run is reproducible). It replies
    {"ranking": [ids best first]}; the reply is validated, mapped back through the shuffle and
    expanded to duplicates. Failures after the retries of chat() raise OracleError.

    frames > 0 also sends that many video frames as PNG image_url parts (for vision judges).
    The API key is read from the environment variable named api_key_env at request time; it is
    never stored on this object."""

    def __init__(self, base_url=JUDGE_BASE_URL, model=None, api_key_env="OPENAI_API_KEY",
                 temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, timeout=JUDGE_TIMEOUT,
                 max_retries=JUDGE_MAX_RETRIES, max_seconds=JUDGE_MAX_SECONDS, backoff=JUDGE_BACKOFF,
                 backoff_max=JUDGE_BACKOFF_MAX, seed=0, frames=0, frame_size=336, use_reference=True):
        if not model:
            raise ValueError("JudgeOracle needs model= (the name the endpoint serves)")
        self.client = dict(base_url=base_url, model=model, api_key_env=api_key_env,
                           temperature=temperature, max_tokens=max_tokens, timeout=timeout,
                           max_retries=max_retries, max_seconds=max_seconds, backoff=backoff,
                           backoff_max=backoff_max)
        self.seed, self.frames, self.frame_size, self.use_reference = seed, frames, frame_size, use_reference
        self.calls = 0                      # rank calls so far: with seed, picks each call's shuffle
        self.lock = threading.Lock()

    def chat(self, messages, parse=None):
        """Send messages with this judge's endpoint and retry settings (see chat())."""
        return chat(messages, parse=parse, **self.client)

    def take_calls(self, n):
        """Reserve n consecutive call numbers (thread-safe); returns the first."""
        with self.lock:
            first, self.calls = self.calls, self.calls + n
        return first

    def rank_prompt(self, sample, shown):
        """The user prompt for the distinct responses `shown` (single-line strings), ids 1..n in order."""
        lines = ["Rank the candidate answers to this question about a video, from best to worst.", "",
                 f"Question: {format_question(sample)}"]
        if self.use_reference and sample.get("answer"):
            lines.append(f"Correct answer: {sample['answer'].strip()}")
        lines += ["", "Candidate answers:"]
        for i, response in enumerate(shown, start=1):
            lines.append(f"[{i}] {response or EMPTY_SHOWN}")
        lines += ["", "Judge correctness first" + (" (agreement with the correct answer)" if
                                                      self.use_reference and sample.get("answer") else "")
                  + ", then relevance, detail and consistency with the video.",
                  f'Reply with only a JSON object {{"ranking": [...]}} listing each of the {len(shown)} '
                  "ids exactly once, best answer first."]
        return "\n".join(lines)

    def user_content(self, sample, text):
        """Plain text, or text followed by the video's frames for vision judges."""
        if not self.frames:
            return text
        images = video_frames_png(sample["video"], self.frames, self.frame_size)
        return [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": url}}
                                                   for url in images]

    def rank(self, sample, responses, call=None):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best.
        call: the call number that seeds the shuffle (default: the next one)."""
        if call is None:
            call = self.take_calls(1)
        keys = [" ".join(r.split()) for r in responses]   # as shown: one line per candidate
        unique = list(dict.fromkeys(keys))                 # identical responses are shown once
        if len(unique) <= 1:
            return [0] * len(responses)                # nothing to rank: no request
        shown = unique[:]
        random.Random(f"{self.seed}:{call}").shuffle(shown)
        messages = [{"role": "system", "content": RANK_SYSTEM},
                    {"role": "user", "content": self.user_content(sample, self.rank_prompt(sample, shown))}]
        ranking = self.chat(messages, parse=functools.partial(parse_ranking, n=len(shown)))
        place = {shown[shown_id - 1]: position for position, shown_id in enumerate(ranking)}
        log.debug("sample %s: judge ranking %s", sample.get("id"), ranking)
        return ranks_of([-float(place[k]) for k in keys])

    def rank_many(self, samples, groups, max_workers=8):
        if len(samples) != len(groups):
            raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
        first = self.take_calls(len(groups))   # numbered in input order: shuffles do not depend on threads
        jobs = [functools.partial(self.rank, s, g, call=first + i) for i, (s, g) in enumerate(zip(samples, groups))]
        return run_many(jobs, max_workers)

    def judge_answer(self, question, reference, prediction):
        """Open-ended QA judging (Video-ChatGPT protocol): -> {"pred": "yes"/"no", "score": float 0-5}.
        Raises OracleError when the judge gives no valid verdict after the retries."""
        prompt = ("Evaluate a predicted answer to a question about a video against the correct answer.\n"
                  "Focus on meaningful agreement: synonyms and paraphrases count as correct.\n\n"
                  f"Question: {question.strip()}\nCorrect answer: {reference.strip()}\n"
                  f"Predicted answer: {' '.join(prediction.split()) or EMPTY_SHOWN}\n\n"
                  'Reply with only a JSON object {"pred": "yes" or "no", "score": S}, where pred says '
                  "whether the prediction is correct and S is an integer from 0 to 5 (5 = fully correct).")
        messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": prompt}]
        return self.chat(messages, parse=parse_verdict)

    def __repr__(self):
        c = self.client
        return (f"JudgeOracle(base_url={c['base_url']!r}, model={c['model']!r}, "
                f"api_key_env={c['api_key_env']!r}, seed={self.seed}, frames={self.frames})")


# ---------------------------------------------------------------------------------------------

def make_oracle(name, **options):
    """Build an oracle from the trainer's config: name in ORACLE_NAMES, options its keywords."""
    if name == "reference":
        return ReferenceOracle(**options)
    elif name == "graded":
        return GradedOracle(**options)
    elif name == "reward_model":
        return RewardModelOracle(**options)
    elif name == "judge":
        return JudgeOracle(**options)
    raise ValueError(f"unknown oracle {name!r}; valid: {', '.join(ORACLE_NAMES)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rank groups of responses with an oracle; "
                                     "input lines {\"sample\": {...}, \"responses\": [...]}.")
    parser.add_argument("--oracle", default="reference", choices=ORACLE_NAMES)
    parser.add_argument("--input", required=True, help="JSONL file, '-' for stdin")
    parser.add_argument("--max_workers", type=int, default=8)
    parser.add_argument("--base_url", default=JUDGE_BASE_URL)
    parser.add_argument("--model", default=None)
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=JUDGE_TIMEOUT)
    parser.add_argument("--max_retries", type=int, default=JUDGE_MAX_RETRIES)
    parser.add_argument("--max_seconds", type=float, default=JUDGE_MAX_SECONDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0)
    parser.add_argument("--path", default=None, help="reward model directory (--oracle=reward_model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log_level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    if args.oracle == "judge":
        options = dict(base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
                       temperature=args.temperature, timeout=args.timeout, max_retries=args.max_retries,
                       max_seconds=args.max_seconds, seed=args.seed, frames=args.frames)
    elif args.oracle == "reward_model":
        options = dict(path=args.path, device=args.device)
    else:
        options = {}
    oracle = make_oracle(args.oracle, **options)

    stream = sys.stdin if args.input == "-" else open(args.input)
    with stream:
        items = [json.loads(line) for line in stream if line.strip()]
    samples, groups = [item["sample"] for item in items], [item["responses"] for item in items]
    t0 = time.monotonic()
    results = oracle.rank_many(samples, groups, max_workers=args.max_workers)
    failures = 0
    for sample, responses, result in zip(samples, groups, results):
        out = {"id": sample.get("id"), "responses": responses}
        if isinstance(result, OracleError):
            out["error"], failures = str(result), failures + 1
        else:
            out["ranks"] = result
        print(json.dumps(out), flush=True)
    log.info("%d groups ranked, %d failed, in %.1f s", len(results), failures, time.monotonic() - t0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

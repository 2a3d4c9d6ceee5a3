"""
The LLM judge: one HTTP client for an OpenAI-compatible /v1/chat/completions endpoint (vLLM,
Ollama, OpenAI), the parsers of its replies, and the verdict of open-ended QA evaluation.

    Judge(base_url, model, ...).chat(messages, parse)          one bounded, retried request
    Judge(...).judge_answer(question, reference, prediction)   {"pred": "yes"/"no", "score": 0-5}

oracle.JudgeOracle ranks responses with it; eval.py scores open-ended answers with it. Failures
raise JudgeError with the reason; the API key never appears in one.
"""
import ast
import email.utils
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger("judge")

JUDGE_BASE_URL = "http://127.0.0.1:8000/v1"
JUDGE_TIMEOUT = 60.0        # seconds per HTTP request
JUDGE_MAX_RETRIES = 4       # retries after the first attempt
JUDGE_MAX_SECONDS = 300.0   # total time budget of one call, retries and waits included
JUDGE_BACKOFF = 1.0         # first retry delay; doubles each retry ...
JUDGE_BACKOFF_MAX = 30.0    # ... up to this
JUDGE_MAX_TOKENS = 256
RETRY_STATUS = {408, 409, 429}   # plus every 5xx; other 4xx (auth, bad request) fail at once
EMPTY_SHOWN = "(empty answer)"   # how an empty response is shown to the judge
ANSWER_SYSTEM = ("You are a careful, impartial judge of answers to questions about videos. "
                 "You compare a predicted answer with the correct answer and decide whether "
                 "the prediction is correct.")


class JudgeError(Exception):
    """The judge gave no usable reply after the retries. The message says why; never the API key."""


# ---------------------------------------------------------------------------------------------
# reply parsing

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


# ---------------------------------------------------------------------------------------------
# the HTTP client

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
    most max_retries retries and max_seconds in all. Then raises JudgeError with the last reason.
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
    raise JudgeError(f"judge failed after {attempts} attempt(s) in {time.monotonic() - start:.1f} s: {reason}")


class Judge:
    """One judge endpoint and its retry settings. The API key is read from the environment variable
    named api_key_env at request time; it is never stored on this object."""

    def __init__(self, base_url=JUDGE_BASE_URL, model=None, api_key_env="OPENAI_API_KEY",
                 temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, timeout=JUDGE_TIMEOUT,
                 max_retries=JUDGE_MAX_RETRIES, max_seconds=JUDGE_MAX_SECONDS, backoff=JUDGE_BACKOFF,
                 backoff_max=JUDGE_BACKOFF_MAX):
        if not model:
            raise ValueError(f"{type(self).__name__} needs model= (the name the endpoint serves)")
        self.client = dict(base_url=base_url, model=model, api_key_env=api_key_env,
                           temperature=temperature, max_tokens=max_tokens, timeout=timeout,
                           max_retries=max_retries, max_seconds=max_seconds, backoff=backoff,
                           backoff_max=backoff_max)

    def chat(self, messages, parse=None):
        """Send messages with this judge's endpoint and retry settings (see chat())."""
        return chat(messages, parse=parse, **self.client)

    def judge_answer(self, question, reference, prediction):
        """Open-ended QA judging (Video-ChatGPT protocol): -> {"pred": "yes"/"no", "score": float 0-5}.
        Raises JudgeError when the judge gives no valid verdict after the retries."""
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
        return f"{type(self).__name__}(base_url={c['base_url']!r}, model={c['model']!r}, api_key_env={c['api_key_env']!r})"

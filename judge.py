"""
The LLM judge: one HTTP client for an OpenAI-compatible /v1/chat/completions endpoint (vLLM,
Ollama, OpenAI), the parsers of its replies, and the verdict of open-ended QA evaluation.

    Judge(base_url, model, ...).chat(messages, parse)          one bounded, retried request
    Judge(...).judge_answer(question, reference, prediction)   {"pred": "yes"/"no", "score": 0-5}

oracle.JudgeOracle ranks responses with it; eval.py scores open-ended answers with it. Failures
raise JudgeError with the reason; the API key never appears in one.
"""
import ast
import bisect
import email.utils
import functools
import http.client
import json
import logging
import os
import re
import socket
import threading
import time
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
MAX_REPLY_BYTES = 1 << 20   # a longer HTTP body is refused, read no further
MAX_PARSE_CHARS = 100_000   # reply parsing looks at this much of a reply (judges answer in a few hundred)
MAX_PARSE_ATTEMPTS = 100    # ... and tries at most this many {...} in it
MAX_LITERAL_CHARS = 20_000  # ... and reads at most this many with the slow Python-literal fallback, in all
KEY_FRAGMENT = 6            # any run of this many characters of the API key is scrubbed from a message
SHORTEST_SECRET = 8         # a shorter key ("1", "EMPTY": a local server's placeholder) is not scrubbed: its few
                            # characters would be cut out of every reply (a score of 4 under the key "4")
# how a server or an exception may spell a character: JSON \uXXXX, Python \xXX, URL %XX
ESCAPED_CHAR = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|%([0-9a-fA-F]{2})")
RETRY_STATUS = {408, 409, 429}   # plus every 5xx; other 4xx (auth, bad request) fail at once
EMPTY_SHOWN = "(empty answer)"   # how an empty response is shown to the judge
ANSWER_SYSTEM = ("You are a careful, impartial judge of answers to questions about videos. "
                 "You compare a predicted answer with the correct answer and decide whether "
                 "the prediction is correct.")
JUDGE_PROMPTS = ("videochatgpt", "project")
# Video-ChatGPT's ActivityNet-QA judge (quantitative_evaluation/evaluate_activitynet_qa.py, annotate()),
# word for word: the paper's Table 1 protocol. Its user message is these pieces around the raw question,
# answer and prediction (its literal "{'pred': 'yes', 'score': 4.8}" example is kept as is).
VCG_SYSTEM = "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as valid matches.\n- Evaluate the correctness of the prediction compared to the answer."
VCG_USER = ('Please evaluate the following video-based question-answer pair:\n\nQuestion: ', '\nCorrect Answer: ', '\nPredicted Answer: ',
            "\n\nProvide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.")


class JudgeError(Exception):
    """The judge gave no usable reply after the retries. The message says why; never the API key."""


# ---------------------------------------------------------------------------------------------
# reply parsing

def find_json(text, key=None):
    """The first JSON object in text (prose and ``` fences around it are fine), or None.
    key: the object must contain this key. Python-style dicts {'pred': 'yes'} are accepted too, as some
    judges (and the Video-ChatGPT prompt) produce them. Linear in the text: one pass pairs the braces;
    only balanced pairs that open like a dict ({"k", {'k' or {}) are parsed, at most MAX_PARSE_ATTEMPTS;
    json (C, fast) reads at most twice the text's length in all, the Python-literal fallback (ast, ~100x
    slower) at most MAX_LITERAL_CHARS: nested candidates ({"a": {"a": ...}}) would otherwise cost the
    square of the length (a crafted 60 KB reply took 51 s)."""
    text = text[:MAX_PARSE_CHARS]
    opens, candidates = [], []
    for i, char in enumerate(text):
        if char == "{":
            opens.append(i)
        elif char == "}" and opens:
            start = opens.pop()
            if re.match(r"\{\s*['\"}]", text[start:start + 64]):
                candidates.append((start, i + 1))
    json_budget, literal_budget = 2 * len(text), MAX_LITERAL_CHARS
    for start, end in sorted(candidates)[:MAX_PARSE_ATTEMPTS]:
        segment = text[start:end]
        if len(segment) > json_budget:
            continue
        json_budget -= len(segment)
        try:
            value = json.loads(segment)
        except (ValueError, RecursionError):
            if len(segment) > literal_budget:
                continue
            literal_budget -= len(segment)
            try:
                value = ast.literal_eval(segment)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
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
        for candidate in re.findall(r"\[[^\[\]]*\]", text[:MAX_PARSE_CHARS]):
            try:
                ranking = json.loads(candidate)
                break
            except ValueError:
                continue
        if ranking is None:
            raise ValueError(f"no JSON ranking in reply {text[:200]!r}")
    if not isinstance(ranking, list):
        raise ValueError(f"ranking is not a list: {repr(ranking)[:100]}")
    ids = []
    for item in ranking:
        if isinstance(item, bool) or not isinstance(item, (int, str)) or not str(item).strip().isdigit():
            raise ValueError(f"ranking holds a non-integer id {repr(item)[:100]}")
        ids.append(int(item))
    if len(ids) != n:
        raise ValueError(f"ranking has {len(ids)} ids, expected {n}")
    if sorted(ids) != list(range(1, n + 1)):
        raise ValueError(f"ranking {ids} is not a permutation of 1..{n}")
    return ids


def parse_verdict(text, lenient=False):
    """A judge reply -> {"pred": "yes" / "no" (/ "neither"), "score": float in [0, 5]}; ValueError if
    the reply holds no such dict. The score is kept as given (4.8 stays 4.8: Video-ChatGPT truncated
    it with int()). lenient=True reads "pred" as Video-ChatGPT's aggregation does: "yes" if the word
    yes is in it, else "no" if no is, else "neither" (Video-ChatGPT leaves those out of the accuracy
    silently; eval.py counts them); otherwise pred must be exactly yes or no."""
    found = find_json(text, "pred")
    if found is None:
        raise ValueError(f"no {{'pred': ..., 'score': ...}} object in reply {text[:200]!r}")
    pred = str(found["pred"]).strip().lower()
    if lenient:
        pred = "yes" if "yes" in pred else "no" if "no" in pred else "neither"
    elif pred not in ("yes", "no"):
        raise ValueError(f"pred is {repr(found['pred'])[:100]}, expected yes or no")
    try:
        score = float(found.get("score"))
    except (TypeError, ValueError):
        raise ValueError(f"score is {repr(found.get('score'))[:100]}, expected a number") from None
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


def api_key(env_name):
    """The API key held by the environment variable env_name ("" when unset or env_name is empty), with
    surrounding whitespace stripped (a key read from a file ends with a newline). A key with a space, a
    control or a non-ASCII character inside cannot be sent in an HTTP header: ValueError, naming the
    variable, never the key."""
    key = os.environ.get(env_name, "").strip() if env_name else ""
    if not all(33 <= ord(char) < 127 for char in key):
        raise ValueError(f"the API key in ${env_name} holds a space, control or non-ASCII character "
                         f"({len(key)} characters, not shown); fix the variable")
    return key


def _unescaped(text):
    """text with its \\uXXXX, \\xXX and %XX escapes decoded -> (decoded text, pieces): each piece
    (start in decoded, start in text, length in decoded, length in text) maps decoded characters back."""
    decoded, pieces, at, length = [], [], 0, 0
    for match in ESCAPED_CHAR.finditer(text):
        literal = text[at:match.start()]
        decoded += [literal, chr(int(next(g for g in match.groups() if g), 16))]
        pieces += [(length, at, len(literal), len(literal)), (length + len(literal), match.start(), 1, len(match[0]))]
        at, length = match.end(), length + len(literal) + 1
    decoded.append(text[at:])
    pieces.append((length, at, len(text) - at, len(text) - at))
    return "".join(decoded), pieces


def _scrub(text, secret):
    """The text without the secret, however a server or an exception shows it: whole, masked or cut (every
    run of KEY_FRAGMENT or more of its characters, and a piece of its start cut off at the end of the text),
    plain or spelled with \\u, \\x or % escapes (a key that itself holds "%41" is found as written, too);
    each such run becomes "***". Linear in the text (one str.find pass per fragment of the key). Call it on
    whole texts, before any is shortened for a message. A key under SHORTEST_SECRET characters is left."""
    if not secret or not text or len(secret) < SHORTEST_SECRET:
        return text
    return _scrub_runs(_scrub_runs(text, secret, decode=False), secret, decode=True)


def _scrub_runs(text, secret, decode):
    """_scrub's work on the text as written (decode=False) or with its escapes decoded (decode=True)."""
    decoded, pieces = _unescaped(text) if decode else (text, [(0, 0, len(text), len(text))])
    size, runs = min(KEY_FRAGMENT, len(secret)), []
    for fragment in {secret[i:i + size] for i in range(len(secret) - size + 1)}:
        at = decoded.find(fragment)
        while at >= 0:
            runs.append((at, at + size))
            at = decoded.find(fragment, at + 1)
    for length in range(min(size - 1, len(decoded)), 0, -1):    # a read limit or a cut took its end
        if decoded.endswith(secret[:length]):
            runs.append((len(decoded) - length, len(decoded)))
            break
    if not runs:
        return text
    starts = [piece[0] for piece in pieces]

    def source(index, end=False):    # decoded index -> text index (of its first, or past its last, character)
        first, at, length, text_length = pieces[bisect.bisect_right(starts, index) - 1]
        if length == text_length:
            return at + index - first + end
        return at + text_length * end
    merged = []
    for start, stop in sorted(runs):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    out, at = [], 0
    for start, stop in merged:
        out += [text[at:source(start)], "***"]
        at = source(stop - 1, end=True)
    return "".join(out) + text[at:]


def _excerpt(text, limit, secret):
    """At most `limit` characters of text for a message, scrubbed; the scrub sees six times the key's length
    past the cut (a \\u escape spells a character in six), so no piece of the key survives at the cut."""
    return _scrub(text[:limit + 6 * len(secret)], secret)[:limit]


def _post(url, body, headers, timeout, deadline):
    """One POST over http.client -> (status, headers, body bytes, at most MAX_REPLY_BYTES + 1). Redirects
    are not followed (the API key goes to base_url only). A watchdog shuts the socket at `deadline`, so
    connect, headers and body together end by then however slowly a server sends."""
    parts = urllib.parse.urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)
    wait = max(0.001, min(timeout, deadline - time.monotonic()))
    if proxy and not urllib.request.proxy_bypass(parts.hostname):    # as urllib would: *_proxy, no_proxy
        proxy = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        connection = connection_class(proxy.hostname, proxy.port, timeout=wait)
        connection.set_tunnel(parts.hostname, parts.port)
    else:
        connection = connection_class(parts.hostname, parts.port, timeout=wait)

    # the socket is remembered: when a server closes after its reply (HTTP/1.0, "Connection: close"),
    # getresponse() hands it to the response and connection.sock becomes None (a dripping HTTP/1.0 judge
    # was never cut off)
    sockets, response = [], None

    def cut_off():
        for sock in [connection.sock] + sockets:
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:          # already closed
                pass
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut_off)
    watchdog.start()
    try:
        connection.request("POST", target, body=body, headers=headers)
        sockets.append(connection.sock)
        response = connection.getresponse()
        return response.status, response.headers, response.read(MAX_REPLY_BYTES + 1)
    finally:
        watchdog.cancel()
        connection.close()
        if response is not None:
            response.close()


def chat(messages, base_url=JUDGE_BASE_URL, model=None, api_key_env="OPENAI_API_KEY",
         temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, timeout=JUDGE_TIMEOUT,
         max_retries=JUDGE_MAX_RETRIES, max_seconds=JUDGE_MAX_SECONDS, backoff=JUDGE_BACKOFF,
         backoff_max=JUDGE_BACKOFF_MAX, parse=None, deadline=None):
    """POST one chat completion to an OpenAI-compatible endpoint; the one HTTP client of this project.

    messages: list of {"role", "content"} dicts; parse: str -> value, raising ValueError when the
    reply is unusable (None returns the reply text). Retries, with exponential backoff (Retry-After
    honoured), timeouts, connection errors, 408/409/429/5xx and replies parse rejects; at most
    max_retries retries. The whole call, every byte of every reply included, ends within max_seconds
    (or by `deadline`, a time.monotonic() value, if earlier). Then raises JudgeError with the last
    reason; a reply however malformed (nested 100,000 deep, say) is an invalid reply, never another
    exception. The API key is read from the environment variable api_key_env at each request (absent
    is fine for local servers; see api_key), is sent to base_url's host only (a redirect is refused, not
    followed), and no piece of it (KEY_FRAGMENT characters, plain, masked or escaped: _scrub) enters a
    log record, an exception, what parse sees, or the object it was called on."""
    url = base_url.rstrip("/")
    if not urllib.parse.urlsplit(url).path:     # "http://host:port" -> the conventional /v1 root
        url += "/v1"
    url += "/chat/completions"
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"judge base_url must be http(s)://..., got {base_url!r}")
    data = json.dumps({"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}).encode()
    start = time.monotonic()
    deadline = min(start + max_seconds, deadline or float("inf"))
    delay, reason, attempts, key = backoff, "no attempt made", 0, ""
    while time.monotonic() < deadline:
        try:
            key = api_key(api_key_env)
        except ValueError as e:
            reason = str(e)
            break
        attempts += 1
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        wait = None   # a server-requested wait (Retry-After)
        try:
            log.debug("POST %s model=%s attempt=%d", url, model, attempts)
            status, reply_headers, raw = _post(url, data, headers, timeout, deadline)
            text = raw[:MAX_REPLY_BYTES].decode("utf-8", "replace")
            if len(raw) > MAX_REPLY_BYTES:
                reason = f"reply from {url} is larger than {MAX_REPLY_BYTES} bytes; refused"
            elif 300 <= status < 400:
                reason = (f"HTTP {status} from {url}: redirect to {_excerpt(reply_headers.get('Location', '?'), 300, key)!r} "
                          "refused (the API key is sent to base_url only; point base_url at the final address)")
                break
            elif status != 200:
                reason = f"HTTP {status} from {url}: {_excerpt(text.strip(), 300, key)}"
                if status not in RETRY_STATUS and status < 500:
                    break                                   # auth / bad request / no such model: final
                wait = _retry_after(reply_headers.get("Retry-After"))   # 429 and 503 may say how long
            else:
                try:   # a reply nested 100,000 deep makes json raise RecursionError: an invalid reply too
                    content = json.loads(text)["choices"][0]["message"]["content"]
                    if not isinstance(content, str):
                        raise TypeError(f"content is {type(content).__name__}")
                except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
                    raise ValueError(f"malformed completion ({type(e).__name__}): {_excerpt(text, 200, key)!r}") from None
                # parse sees the part of the content parsing reads, scrubbed, so its messages cannot show the key
                return content if parse is None else parse(_scrub(content[:MAX_PARSE_CHARS], key))
        except (TimeoutError, socket.timeout):
            reason = f"timeout after {timeout:.3g} s from {url}"
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            late = time.monotonic() >= deadline
            reason = (f"max_seconds={max_seconds} reached while talking to {url}" if late else
                      _scrub(f"connection error for {url}: {type(e).__name__}: {e}", key))
        except (ValueError, RecursionError) as e:   # malformed completion, or parse rejected the reply
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
    # raised outside any except block, so the error carries no exception of the HTTP stack as its context
    raise JudgeError(_scrub(f"judge failed after {attempts} attempt(s) in {time.monotonic() - start:.1f} s: {reason}", key))


class Judge:
    """One judge endpoint and its retry settings. The API key is read from the environment variable
    named api_key_env at request time; it is never stored on this object. A key that cannot be sent
    (whitespace inside, see api_key) raises ValueError here, before any work."""

    def __init__(self, base_url=JUDGE_BASE_URL, model=None, api_key_env="OPENAI_API_KEY",
                 temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, timeout=JUDGE_TIMEOUT,
                 max_retries=JUDGE_MAX_RETRIES, max_seconds=JUDGE_MAX_SECONDS, backoff=JUDGE_BACKOFF,
                 backoff_max=JUDGE_BACKOFF_MAX):
        if not model:
            raise ValueError(f"{type(self).__name__} needs model= (the name the endpoint serves)")
        api_key(api_key_env)     # a key that cannot be sent is an error now, not at the first request
        self.client = dict(base_url=base_url, model=model, api_key_env=api_key_env,
                           temperature=temperature, max_tokens=max_tokens, timeout=timeout,
                           max_retries=max_retries, max_seconds=max_seconds, backoff=backoff,
                           backoff_max=backoff_max)

    def chat(self, messages, parse=None, deadline=None):
        """Send messages with this judge's endpoint and retry settings (see chat())."""
        return chat(messages, parse=parse, deadline=deadline, **self.client)

    def judge_answer(self, question, reference, prediction, prompt="videochatgpt"):
        """Open-ended QA judging -> {"pred": "yes" / "no" / "neither", "score": float 0-5}.
        prompt="videochatgpt" (the default, the paper's Table 1): Video-ChatGPT's system and user messages
        word for word, with the raw question, answer and prediction, and its reading of "pred"
        (parse_verdict(lenient=True)); "project": this project's own messages (JSON asked for, an empty
        prediction shown as such), pred exactly yes or no. Unlike Video-ChatGPT, which retries a malformed
        reply forever, a reply that stays malformed after this judge's retries raises JudgeError."""
        if prompt == "videochatgpt":
            user = "".join(part for pair in zip(VCG_USER, (question, reference, prediction, "")) for part in pair)
            messages = [{"role": "system", "content": VCG_SYSTEM}, {"role": "user", "content": user}]
            return self.chat(messages, parse=functools.partial(parse_verdict, lenient=True))
        if prompt != "project":
            raise ValueError(f"prompt must be one of {JUDGE_PROMPTS}, got {prompt!r}")
        text = ("Evaluate a predicted answer to a question about a video against the correct answer.\n"
                "Focus on meaningful agreement: synonyms and paraphrases count as correct.\n\n"
                f"Question: {question.strip()}\nCorrect answer: {reference.strip()}\n"
                f"Predicted answer: {' '.join(prediction.split()) or EMPTY_SHOWN}\n\n"
                'Reply with only a JSON object {"pred": "yes" or "no", "score": S}, where pred says '
                "whether the prediction is correct and S is an integer from 0 to 5 (5 = fully correct).")
        messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": text}]
        return self.chat(messages, parse=parse_verdict)

    def __repr__(self):
        c = self.client
        return f"{type(self).__name__}(base_url={c['base_url']!r}, model={c['model']!r}, api_key_env={c['api_key_env']!r})"

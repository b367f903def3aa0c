"""LLM-as-judge: grade several responses to one question on a 1-9 scale via an OpenAI-compatible API.

The endpoint comes from the environment (nothing is hard-wired, nothing is sent unless asked):
``LORALAB_JUDGE_URL`` (the base URL, e.g. ``https://host/v1``, or the full ``.../chat/completions``),
``LORALAB_JUDGE_KEY`` (sent as ``Authorization: Bearer <key>``), ``LORALAB_JUDGE_MODEL``.
The judge is asked for a JSON list with one integer per response, in order; the reply is parsed
strictly (exactly that many integers, each in 1..9) and anything else raises ``JudgeError`` showing
the reply. Transport errors (connection, timeout, HTTP 429 / 5xx) are retried with a doubling pause;
other HTTP errors (401, 404, ...) fail at once with the server's message.
Uses only the standard library (urllib).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Sequence

SYSTEM = ("You are a strict, fair judge of answers written by AI assistants. You grade helpfulness, "
          "correctness and clarity. You reply with JSON only.")
PROMPT = """Question:
{question}

{responses}

Grade each of the {n} responses above on a scale from 1 (useless or wrong) to 9 (excellent).
Reply with only a JSON list of {n} integers, one per response in the order given, e.g. {example}."""


class JudgeError(RuntimeError):
    """The judge could not be reached, refused, or replied with something that is not the scores."""


@dataclass
class JudgeEndpoint:
    url: str
    key: str
    model: str
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_env(cls, **kw) -> "JudgeEndpoint":
        names = ("LORALAB_JUDGE_URL", "LORALAB_JUDGE_KEY", "LORALAB_JUDGE_MODEL")
        missing = [n for n in names if not os.environ.get(n)]
        if missing:
            raise JudgeError(f"LLM judge not configured: set {', '.join(missing)} (an OpenAI-compatible "
                             "chat-completions endpoint, its API key, and the judge model name)")
        url, key, model = (os.environ[n] for n in names)
        return cls(url=url, key=key, model=model, **kw)

    @property
    def completions_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


def judge_prompt(question: str, responses: Sequence[str]) -> str:
    blocks = "\n\n".join(f"Response {i + 1}:\n{r}" for i, r in enumerate(responses))
    example = json.dumps([5] * len(responses))
    return PROMPT.format(question=question, responses=blocks, n=len(responses), example=example)


def parse_scores(reply: str, n: int) -> list[int]:
    """The first JSON list in ``reply`` (code fences allowed) as exactly n integers in 1..9."""
    match = re.search(r"\[[^\[\]]*\]", reply)
    try:
        scores = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        scores = None
    ok = (isinstance(scores, list) and len(scores) == n
          and all(isinstance(s, (int, float)) and not isinstance(s, bool) and float(s).is_integer()
                  and 1 <= s <= 9 for s in scores))
    if not ok:
        raise JudgeError(f"judge reply is not a JSON list of {n} integers in 1..9: {reply[:500]!r}")
    return [int(s) for s in scores]


def _post(endpoint: JudgeEndpoint, body: dict) -> dict:
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {endpoint.key}"}
    last: Exception | None = None
    for attempt in range(endpoint.retries + 1):
        if attempt:
            time.sleep(endpoint.backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(endpoint.completions_url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=endpoint.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            last = JudgeError(f"judge endpoint {endpoint.completions_url} answered HTTP {e.code}: {detail}")
            if e.code != 429 and e.code < 500:
                raise last from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = JudgeError(f"judge endpoint {endpoint.completions_url} unreachable: {e}")
        except json.JSONDecodeError as e:
            raise JudgeError(f"judge endpoint {endpoint.completions_url} did not return JSON: {e}") from e
    raise JudgeError(f"{last} (gave up after {endpoint.retries + 1} attempts)")


def judge_scores(question: str, responses: Sequence[str], endpoint: JudgeEndpoint | None = None) -> list[int]:
    """Scores 1..9 for each response to ``question`` (endpoint default: from the environment)."""
    if not responses:
        raise ValueError("judge_scores needs at least one response")
    endpoint = endpoint or JudgeEndpoint.from_env()
    body = {"model": endpoint.model, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": judge_prompt(question, responses)}]}
    reply = _post(endpoint, body)
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"judge reply lacks choices[0].message.content: {str(reply)[:500]}") from e
    return parse_scores(str(content), len(responses))

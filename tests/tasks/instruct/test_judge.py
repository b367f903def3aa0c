"""LLM judge client against a loopback OpenAI-compatible server started by the test."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loralab.tasks.instruct import judge as J


class FakeServer:
    """Serves queued (status, body) replies on 127.0.0.1:<free port>; records every request."""

    def __init__(self):
        self.replies: list[tuple[int, str]] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status, text = outer.replies.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(text.encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(content: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server(monkeypatch):
    s = FakeServer()
    monkeypatch.setenv("LORALAB_JUDGE_URL", s.url)
    monkeypatch.setenv("LORALAB_JUDGE_KEY", "sk-test-123")
    monkeypatch.setenv("LORALAB_JUDGE_MODEL", "judge-model")
    yield s
    s.close()


def test_request_and_scores(server):
    server.replies = [(200, completion("Sure:\n```json\n[7, 2]\n```"))]
    scores = J.judge_scores("What is a cat?", ["A small feline.", "A car."])
    assert scores == [7, 2]
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    assert req["body"]["model"] == "judge-model"
    roles = [m["role"] for m in req["body"]["messages"]]
    assert roles == ["system", "user"]
    user = req["body"]["messages"][1]["content"]
    assert "What is a cat?" in user and "Response 1:\nA small feline." in user and "Response 2:\nA car." in user
    assert "JSON list of 2 integers" in user


def test_retry_after_http_500(server):
    server.replies = [(500, '{"error": "overloaded"}'), (200, completion("[9]"))]
    endpoint = J.JudgeEndpoint.from_env(backoff=0.01)
    assert J.judge_scores("q", ["r"], endpoint) == [9]
    assert len(server.requests) == 2


def test_gives_up_after_retries_and_no_retry_on_401(server):
    server.replies = [(503, "{}")] * 3
    with pytest.raises(J.JudgeError, match="HTTP 503.*gave up after 3 attempts"):
        J.judge_scores("q", ["r"], J.JudgeEndpoint.from_env(backoff=0.01, retries=2))
    server.requests.clear()
    server.replies = [(401, '{"error": "bad key"}')]
    with pytest.raises(J.JudgeError, match="HTTP 401.*bad key"):
        J.judge_scores("q", ["r"], J.JudgeEndpoint.from_env(backoff=0.01))
    assert len(server.requests) == 1


@pytest.mark.parametrize("content", ["I like both.", "[7]", "[7, 10]", "[7, 2.5]", "[7, \"x\"]", "[true, 3]"])
def test_malformed_reply_is_a_clear_error(server, content):
    server.replies = [(200, completion(content))]
    with pytest.raises(J.JudgeError, match="not a JSON list of 2 integers in 1..9"):
        J.judge_scores("q", ["a", "b"])


def test_reply_without_choices(server):
    server.replies = [(200, '{"error": "nope"}')]
    with pytest.raises(J.JudgeError, match="lacks choices"):
        J.judge_scores("q", ["a"])


def test_missing_env_is_a_clear_error(monkeypatch):
    for name in ("LORALAB_JUDGE_URL", "LORALAB_JUDGE_KEY", "LORALAB_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORALAB_JUDGE_URL", "http://127.0.0.1:9")
    with pytest.raises(J.JudgeError, match="set LORALAB_JUDGE_KEY, LORALAB_JUDGE_MODEL"):
        J.judge_scores("q", ["a"])


def test_unreachable_endpoint():
    endpoint = J.JudgeEndpoint(url="http://127.0.0.1:9/v1", key="k", model="m", timeout=2, retries=1, backoff=0.01)
    with pytest.raises(J.JudgeError, match="unreachable.*gave up after 2 attempts"):
        J.judge_scores("q", ["a"], endpoint)

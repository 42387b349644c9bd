"""PROTEUS LLM backends: the OpenAI-compatible client against a real HTTP server on 127.0.0.1,
JSON parsing/validation, the replay backend, and the local model's constrained decoding."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lmfuse.proteus.llm import (LLMError, OpenAICompatBackend, ReplayBackend, ask_json, make_backend,
                                parse_json_reply, validate_json)

ACTION_SCHEMA = {
    "type": "object",
    "properties": {"tool": {"enum": ["differential_abundance", "cluster_samples"]},
                   "fdr": {"enum": [0.01, 0.05, 0.1]},
                   "rationale": {"type": "string", "maxLength": 100}},
    "required": ["tool", "fdr"],
    "additionalProperties": False,
}


def _completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 2},
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class _Server:
    """A chat-completions server whose answers are scripted per request: ("ok", text),
    ("status", code), ("sleep", seconds, text) or ("garbage", bytes)."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                action = outer.script.pop(0) if outer.script else ("status", 500)
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                if action[0] == "status":
                    self.send_response(action[1])
                    self.end_headers()
                    self.wfile.write(b'{"error": "scripted"}')
                    return
                data = _completion(action[1]) if action[0] == "ok" else action[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


MSGS = [{"role": "user", "content": "choose an analysis"}]


def test_openai_compat_structured_request_and_reply():
    reply = {"tool": "cluster_samples", "fdr": 0.05}
    with _Server([("ok", json.dumps(reply))]) as srv:
        be = OpenAICompatBackend(srv.url, model="m1", api_key="sk-secret", retries=0)
        assert ask_json(be, MSGS, ACTION_SCHEMA) == reply
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-secret"
    assert req["body"]["model"] == "m1"
    assert req["body"]["response_format"]["type"] == "json_schema"
    assert req["body"]["response_format"]["json_schema"]["schema"] == ACTION_SCHEMA
    assert "sk-secret" not in repr(be)
    assert be.usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_openai_compat_env_configuration(monkeypatch):
    with _Server([("ok", "hello")]) as srv:
        monkeypatch.setenv("LMFUSE_LLM_URL", srv.url)
        monkeypatch.setenv("LMFUSE_LLM_MODEL", "env-model")
        monkeypatch.setenv("LMFUSE_LLM_KEY", "k2")
        be = OpenAICompatBackend(retries=0)
        assert be.chat(MSGS) == "hello"
    assert srv.requests[0]["body"]["model"] == "env-model" and srv.requests[0]["auth"] == "Bearer k2"


def test_malformed_json_is_retried_with_the_errors_then_accepted():
    good = {"tool": "differential_abundance", "fdr": 0.1}
    with _Server([("ok", "Sure! {\"tool\": \"differential_abundance\", \"fdr\": "),
                  ("ok", "```json\n" + json.dumps(good) + "\n```")]) as srv:
        transcript = []
        be = OpenAICompatBackend(srv.url, retries=0)
        assert ask_json(be, MSGS, ACTION_SCHEMA, transcript=transcript) == good
    assert len(transcript) == 2 and transcript[0]["errors"] and not transcript[1]["errors"]
    # the retry carried the validation error back to the model
    assert "not valid" in srv.requests[1]["body"]["messages"][-1]["content"]


def test_schema_invalid_reply_twice_raises():
    bad = json.dumps({"tool": "rm -rf", "fdr": 0.05})
    with _Server([("ok", bad), ("ok", bad)]) as srv:
        with pytest.raises(LLMError, match="is not one of"):
            ask_json(OpenAICompatBackend(srv.url, retries=0), MSGS, ACTION_SCHEMA)


def test_timeout_is_retried_then_succeeds():
    with _Server([("sleep", 1.5, "late"), ("ok", "on time")]) as srv:
        be = OpenAICompatBackend(srv.url, timeout=0.3, retries=1, backoff=0.0)
        assert be.chat(MSGS) == "on time"
        assert be.requests == 2


def test_timeout_without_retries_raises():
    with _Server([("sleep", 1.5, "late")]) as srv:
        with pytest.raises(LLMError, match="timed out"):
            OpenAICompatBackend(srv.url, timeout=0.3, retries=0).chat(MSGS)


def test_error_statuses():
    with _Server([("status", 503), ("ok", "recovered")]) as srv:
        assert OpenAICompatBackend(srv.url, retries=1, backoff=0.0).chat(MSGS) == "recovered"
    with _Server([("status", 401), ("ok", "never")]) as srv:
        with pytest.raises(LLMError, match="HTTP 401"):
            OpenAICompatBackend(srv.url, retries=3, backoff=0.0).chat(MSGS)
        assert len(srv.requests) == 1  # a client error is not retried
    with _Server([("garbage", b"<html>not json</html>")]) as srv:
        with pytest.raises(LLMError, match="not a chat completion"):
            OpenAICompatBackend(srv.url, retries=0).chat(MSGS)


def test_unreachable_endpoint():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(LLMError, match="cannot reach|failed"):
        OpenAICompatBackend(f"http://127.0.0.1:{port}/v1", retries=0, timeout=2).chat(MSGS)


def test_bad_options():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatBackend("ftp://x")
    with pytest.raises(ValueError, match="timeout"):
        OpenAICompatBackend("http://127.0.0.1:1/v1", timeout=0)
    with pytest.raises(ValueError, match="structured"):
        OpenAICompatBackend("http://127.0.0.1:1/v1", structured="xml")
    with pytest.raises(ValueError, match="llm must be"):
        make_backend("gpt")
    assert make_backend("none") is None
    with pytest.raises(ValueError, match="messages"):
        ReplayBackend(["{}"]).chat([{"role": "robot", "content": "x"}])


def test_parse_and_validate():
    assert parse_json_reply('noise {"a": [1, 2]} trailing') == {"a": [1, 2]}
    with pytest.raises(LLMError):
        parse_json_reply("no json here {")
    assert validate_json({"tool": "cluster_samples", "fdr": 0.05}, ACTION_SCHEMA) == []
    errs = validate_json({"tool": "cluster_samples", "fdr": 0.2, "x": 1}, ACTION_SCHEMA)
    assert any("0.2" in e for e in errs) and any("unexpected" in e for e in errs)
    assert validate_json({"fdr": 0.05}, ACTION_SCHEMA) == ["$: missing required property 'tool'"]
    assert validate_json(True, {"type": "integer"})  # a bool is not an integer
    ref = {"$defs": {"k": {"type": "integer", "minimum": 2}}, "type": "object",
           "properties": {"k": {"$ref": "#/$defs/k"}}}
    assert validate_json({"k": 1}, ref) and not validate_json({"k": 3}, ref)


def test_replay_backend_order_errors_and_exhaustion():
    be = ReplayBackend([{"tool": "cluster_samples", "fdr": 0.01}, LLMError("scripted failure")])
    assert ask_json(be, MSGS, ACTION_SCHEMA)["tool"] == "cluster_samples"
    with pytest.raises(LLMError, match="scripted failure"):
        be.chat(MSGS)
    with pytest.raises(LLMError, match="ran out"):
        be.chat(MSGS)
    assert len(be.calls) == 3 and be.calls[0]["schema"] == ACTION_SCHEMA


def test_replay_from_run_log(tmp_path):
    log = tmp_path / "run_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"event": "step", "step_id": "s1"}, {"event": "llm", "reply": "A"}, {"event": "llm", "reply": "B"}]) + "\n")
    be = ReplayBackend.from_run_log(tmp_path)
    assert [be.chat(MSGS), be.chat(MSGS)] == ["A", "B"]

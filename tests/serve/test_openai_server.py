"""`tunesmith serve` started on loopback, driven by the official ``openai`` client: chat and
completions, streaming and not, the base and two adapters chosen by ``model`` with the same text as
``tunesmith.generate``; usage, n, stop, logprobs; OpenAI-shaped errors after which the server still
answers; a graceful shutdown on SIGTERM."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import json
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the official OpenAI client drives the server (dev extra)")
pytest.importorskip("fastapi", reason="tunesmith serve needs the serve extra (FastAPI, uvicorn)")

import tunesmith
from additive_helpers import perturb
from helpers import alpaca_rows, run_config, tiny, write_jsonl
from tunesmith.methods import registry

pytestmark = pytest.mark.slow   # a server process that imports torch, transformers and FastAPI: 30-60 s here

KEY = "sk-test-key"
SRC = str(Path(__file__).resolve().parents[2] / "src")
PROMPTS = ["Add 1 and 2.", "Add 30 and 4."]


def _adapters(tmp: Path) -> dict[str, Path]:
    f = write_jsonl(tmp / "a.jsonl", alpaca_rows(8))
    run, _ = tunesmith.train(run_config(f, tmp, {"name": "lora", "r": 4}, max_steps=1, lr=1e-1, seed=0))
    base = tiny("llama")                      # what the server and tunesmith.load rebuild for random:llama
    model = tunesmith.apply(copy.deepcopy(base), "lora", r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    perturb(model, scale=0.5, seed=3)
    b = registry.attached(model).save(model, tmp / "b", "random:llama")
    return {"a": run, "b": b}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    paths = _adapters(tmp)
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "random:llama", "--name", "base", "--device", "cpu",
           "--adapter", f"a={paths['a']}", "--adapter", f"b={paths['b']}", "--port", "0", "--api-key", KEY,
           "--max-tokens", "64", "--max-body-bytes", "20000", "--max-batch", "8", "--warmup", "1,8"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    while not (seen and seen[-1].startswith("tunesmith serve: http://")):
        line = proc.stdout.readline()
        assert line, "the server exited:\n" + "".join(seen)
        seen.append(line)
    url = seen[-1].split()[2]
    assert any("adapter a" in s and "per row" in s for s in seen)   # the LoRA runs share the base
    assert any(s.startswith("tunesmith serve: warmed up at batch sizes 1, 8 in ") for s in seen)
    for _ in range(200):
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    yield url, paths, proc
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def expected(server):
    """tunesmith.generate's greedy text for each served model, chat and completion prompts."""
    _, paths, _ = server
    out = {}
    for name, src in (("base", "random:llama"), ("a", paths["a"]), ("b", paths["b"])):
        model, tok = tunesmith.load(src, device="cpu")
        for chat in (True, False):
            out[name, chat] = tunesmith.generate(model, PROMPTS, tokenizer=tok, max_new_tokens=8, chat=chat)
    return out


@pytest.mark.parametrize("name", ["base", "a", "b"])
def test_chat_and_completions_equal_tunesmith_generate(client, expected, name):
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == expected[name, True][0] and r.model == name
    chunks = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[name, True][0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    c = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert c.choices[0].text == expected[name, False][1]
    streamed = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(x.choices[0].text for x in streamed if x.choices) == expected[name, False][1]


def test_the_adapters_answer_differently(expected):
    assert len({tuple(expected[n, True]) for n in ("base", "a", "b")}) == 3


def test_models_usage_n_stop_and_logprobs(client, expected):
    assert [m.id for m in client.models.list().data] == ["base", "a", "b"]
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    r = client.chat.completions.create(model="a", messages=msgs, max_tokens=6, temperature=0.9, seed=5, n=3,
                                       logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    for c in r.choices:
        for t in c.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    again = client.chat.completions.create(model="a", messages=msgs, max_tokens=6, temperature=0.9, seed=5, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]   # seeded
    full = expected["b", False][1]
    stop = full.split()[2]
    c = client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=8, temperature=0, stop=[stop], logprobs=1)
    assert c.choices[0].finish_reason == "stop" and c.choices[0].text == full[:full.index(stop)]
    assert c.choices[0].logprobs.token_logprobs and len(c.choices[0].logprobs.top_logprobs[0]) == 1
    usage = list(client.chat.completions.create(model="base", messages=msgs, max_tokens=4, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))[-1].usage
    assert usage.completion_tokens >= 1 and usage.prompt_tokens > 0


def _raw(url, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    """POST ``body`` as it is (no client-side checks): (status, JSON answer)."""
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_errors_are_openai_shaped_and_the_server_still_answers(server, client):
    url = server[0]
    ok = b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'
    cases = [
        (b'{"model": "base", "messages": [', KEY, 400, "malformed JSON"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', KEY, 404, "'nope' is not served"),
        (ok.replace(b'"max_tokens": 3', b'"max_tokens": -5'), KEY, 400, "at least 1"),
        (ok.replace(b'"max_tokens": 3', b'"max_tokens": 100000'), KEY, 400, "limit of 64"),
        (ok.replace(b'"max_tokens": 3', b'"temperature": "hot"'), KEY, 400, "temperature"),
        (ok, None, 401, "missing API key"),
        (ok, "sk-wrong", 401, "incorrect API key"),
        (ok.replace(b'"hi"', b'"' + b"x" * 30000 + b'"'), KEY, 413, "limit of 20000 bytes"),
    ]
    for body, key, status, words in cases:
        code, answer = _raw(url, body, key)
        err = answer["error"]
        assert code == status and words in err["message"], (status, answer)
        assert set(err) == {"message", "type", "param", "code"}
        assert _raw(url, ok)[0] == 200          # still answering
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="base", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="bad", max_retries=0).models.list()
    assert client.models.list().data


def test_graceful_shutdown_on_sigterm(server, client):
    _, _, proc = server
    stream = client.completions.create(model="base", prompt="hi", max_tokens=64, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)          # the request in flight still finishes
    rest = list(stream)
    assert first.choices[0].text and rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=30) == 0
    assert "tunesmith serve: stopped" in proc.stdout.read()

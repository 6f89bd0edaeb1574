"""The server's limits and scoring, in process (FastAPI's TestClient): a full queue answers 429, a
request past its timeout 504, limits on n / stop / unsupported parameters 400 — each OpenAI-shaped,
with the server answering afterwards; /v1/score/evaluation against the model's own logits."""
from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("fastapi", reason="tunesmith serve needs the serve extra (FastAPI, uvicorn)")
from fastapi.testclient import TestClient  # noqa: E402

from helpers import tiny
from tunesmith.infer.engine import Engine, Request, SamplingParams
from tunesmith.serve.app import create_app
from tunesmith.serve.score import Scorer
from tunesmith.serve.settings import Settings

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def _client(engine, scorers=None, **settings):
    return TestClient(create_app(engine, Settings(**settings), scorers=scorers))


def _ok(c):
    r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def _error(r, status, words):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}
    return err


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


def test_a_full_queue_answers_429_then_serves_again(model, tokenizer):
    engine = Engine(model, tokenizer, fast=False, max_batch=1, max_queue=1)
    with _client(engine) as c:
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        busy = [engine.submit(Request(prompt="a", params=long))]
        while engine.load["running"] == 0:
            time.sleep(0.005)
        busy.append(engine.submit(Request(prompt="a", params=long)))   # one running, one waiting
        r = c.post("/v1/chat/completions", json=CHAT)
        assert _error(r, 429, "max_queue=1")["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        for h in busy:
            h.cancel()
            h.result(timeout=30)
        _ok(c)


def test_a_request_past_its_timeout_answers_504(model, tokenizer):
    engine = Engine(model, tokenizer, fast=False)
    with _client(engine, request_timeout=0.05) as c:
        body = {**CHAT, "max_tokens": 400, "ignore_eos": True}
        _error(c.post("/v1/chat/completions", json=body), 504, "did not finish within 0.05 s")
        stream = c.post("/v1/chat/completions", json={**body, "stream": True})
        assert stream.status_code == 200 and '"timeout_error"' in stream.text and stream.text.endswith("[DONE]\n\n")
    with _client(engine) as c:
        _ok(c)


def test_parameter_limits(model, tokenizer):
    engine = Engine(model, tokenizer, fast=False)
    with _client(engine, max_n=2) as c:
        _error(c.post("/v1/chat/completions", json={**CHAT, "n": 3}), 400, "n=3 exceeds this server's limit of 2")
        _error(c.post("/v1/chat/completions", json={**CHAT, "stop": list("abcde")}), 400, "at most 4 stop")
        _error(c.post("/v1/chat/completions", json={**CHAT, "tools": [{"type": "function"}]}), 400, "tools")
        _error(c.post("/v1/chat/completions", json={**CHAT, "frequency_penalty": 0.5}), 400, "frequency_penalty")
        _error(c.post("/v1/completions", json={"model": "base", "prompt": [[10**7]]}), 400, "outside this model's "
                                                                                               "vocabulary")
        _error(c.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400, "messages")
        _error(c.post("/v1/chat/completions", content=b"[1, 2]"), 400, "JSON object")
        _error(c.get("/v1/models/nope"), 404, "'nope' is not served")
        assert c.post("/v1/chat/completions", json={**CHAT, "frequency_penalty": 0, "response_format": {"type": "text"}}
                      ).status_code == 200   # no-op values that clients send by default
        _ok(c)


def _logits(model, tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()


def test_scoring_endpoint(model, tokenizer):
    reward = tiny("llama", task="classification", num_labels=1, seed=3).eval()
    reward.config.pad_token_id = tokenizer.pad_token_id
    cls = tiny("bert", task="classification", num_labels=2, seed=4).eval()
    scorers = {"rm": Scorer(reward, tokenizer), "cls": Scorer(cls, tokenizer, ["neg", "pos"])}
    texts = ["a good answer", "bad"]
    with _client(Engine(model, tokenizer, fast=False), scorers=scorers) as c:
        r = c.post("/v1/score/evaluation", json={"model": "rm", "messages": texts})
        assert r.status_code == 200 and r.json()["object"] == "score.evaluation"
        assert r.json()["scores"] == pytest.approx(_logits(reward, tokenizer, texts)[:, 0].tolist(), abs=1e-5)
        r = c.post("/v1/score/evaluation", json={"model": "cls", "messages": texts}).json()
        probs = _logits(cls, tokenizer, texts).softmax(-1)
        assert r["scores"] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
        assert r["labels"][0]["neg"] == pytest.approx(float(probs[0, 0]), abs=1e-5)
        _error(c.post("/v1/score/evaluation", json={"model": "base", "messages": texts}), 404, "no scoring model")
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "rm", "cls"]
    with pytest.raises(ValueError, match="sequence classifier"):
        Scorer(model, tokenizer)


def test_adapters_load_and_unload_over_http(model, tokenizer, tmp_path):
    import copy

    import tunesmith
    from additive_helpers import perturb
    from tunesmith.methods import registry
    lora = tunesmith.apply(copy.deepcopy(model), "lora", r=2)
    perturb(lora, scale=0.5, seed=1)
    path = registry.attached(lora).save(lora, tmp_path / "x", "random:llama")
    engine = Engine(copy.deepcopy(model), tokenizer, fast=False)
    body = {"lora_name": "x", "lora_path": str(path)}
    with _client(engine) as c:
        _error(c.post("/v1/load_lora_adapter", json=body), 404, "--allow-adapter-loading")
    with _client(engine, allow_adapter_loading=True) as c:
        _error(c.post("/v1/load_lora_adapter", json={**body, "lora_path": "/no/such"}), 400, "does not exist")
        r = c.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200 and r.json()["shares_base"] is True
        _error(c.post("/v1/load_lora_adapter", json=body), 400, "served already")
        got = c.post("/v1/completions", json={"model": "x", "prompt": "Add 1 and 2.", "max_tokens": 5,
                                              "temperature": 0}).json()["choices"][0]["text"]
        assert got == tunesmith.generate(lora, "Add 1 and 2.", tokenizer=tokenizer, max_new_tokens=5, chat=False)
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).json()["deleted"] is True
        _error(c.post("/v1/completions", json={"model": "x", "prompt": "hi"}), 404, "'x' is not served")
        _error(c.post("/v1/unload_lora_adapter", json={"lora_name": "x"}), 404, "cannot remove 'x'")

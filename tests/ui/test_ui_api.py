"""`tunesmith ui`'s API through FastAPI's TestClient: the form's schema is the config's, a bad field
answers with the CLI's own message and starts nothing, the key is needed off loopback, and (slow) two
runs started at once both finish, one of them stopped and resumed on the way, then export and merge."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="tunesmith ui needs the serve extra (FastAPI, uvicorn)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (dev extra)")
from fastapi.testclient import TestClient

from helpers import alpaca_rows, write_jsonl
from tunesmith import cli
from tunesmith.commands.ui import check_host
from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import registry
from tunesmith.ui.app import create_app

KEY = "sk-ui-test"


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(tmp_path / "runs")) as c:
        yield c


def form(train_file, fields=None, typed=None, method="lora"):
    f = {"data.train": str(train_file), "model.name_or_path": "random:llama", "model.device": "cpu",
         "train.max_seq_len": "64", "train.batch_size": "4", "train.progress": "true", **(fields or {})}
    return {"fields": f, "typed": {"method.name": method, **(typed or {})}}


def test_schema_is_the_config_schema(client):
    s = client.get("/api/schema").json()
    assert s["sections"]["train"] == TrainConfig.model_json_schema()
    assert set(s["methods"]) == set(registry.all_configs())
    assert s["methods"]["lora"]["schema"]["properties"]["r"]["default"] == 8
    assert {"sft", "pt", "cls"} <= {o["name"] for o in s["objectives"]}
    assert "smollm2-135m" in s["models"]["embedded"] and "random:llama" in s["models"]["random"]


def test_preview_detects_the_format(client, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    r = client.post("/api/preview", json={"path": str(f), "rows": 3}).json()
    assert r["format"] == "alpaca" and len(r["rows"]) == 3 and r["rows"][0] == alpaca_rows(8)[0]
    missing = client.post("/api/preview", json={"path": str(tmp_path / "nope.jsonl")})
    assert missing.status_code == 400 and "data file not found" in missing.json()["error"]


@pytest.mark.parametrize("fields,typed", [
    ({"train.lr": "-1"}, {}),
    ({"method.r": "0"}, {}),
    ({"train.max_steps": "abc"}, {}),
    ({"train.max_steps": "3", "train.epochs": "1"}, {}),
    ({}, {"data.format": "tsv"}),
    ({"method.rank": "4"}, {}),
])
def test_a_bad_field_gives_the_cli_message_and_starts_no_run(client, tmp_path, monkeypatch, capsys, fields, typed):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    r = client.post("/api/runs", json=form(f, fields, typed))
    assert r.status_code == 400
    answer = r.json()
    assert answer["error"] and answer["field"]
    assert client.post("/api/validate", json=form(f, fields, typed)).json() == answer
    # the YAML the page shows, saved as form.yaml and given to the CLI: the very same message
    monkeypatch.chdir(tmp_path)
    Path("form.yaml").write_text(answer["yaml"])
    assert cli.main(["train", "form.yaml"]) == 2
    assert capsys.readouterr().err == f"error: {answer['error']}\n"
    assert list((tmp_path / "runs").iterdir()) == []       # no run directory, no job state
    assert client.get("/api/runs").json() == []


def test_output_dir_outside_the_runs_dir_is_refused(client, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    r = client.post("/api/runs", json=form(f, {"output.dir": str(tmp_path / "elsewhere")}))
    assert r.status_code == 400 and "outside the runs directory" in r.json()["error"]
    assert not (tmp_path / "elsewhere").exists()


def test_key_needed_off_loopback(tmp_path, capsys):
    check_host("127.0.0.1", None)
    check_host("::1", None)
    with pytest.raises(ConfigError, match="needs --api-key"):
        check_host("0.0.0.0", None)
    assert cli.main(["ui", "--host", "0.0.0.0", "--api-key", "", "--runs-dir", str(tmp_path)]) == 2
    assert "needs --api-key" in capsys.readouterr().err
    with TestClient(create_app(tmp_path / "runs", api_key=KEY)) as c:
        assert c.get("/api/info").json()["auth"] is True          # open: the page learns it must ask
        assert c.get("/").status_code == 200
        assert c.get("/api/runs").status_code == 401
        assert c.post("/api/chat/open", json={"base": "random:llama"}).status_code == 401
        assert c.get("/engines/0/v1/models").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": f"Bearer {KEY}"}).json() == []


def test_commands_not_in_this_build_answer_501(client, tmp_path):
    from tunesmith.ui import tools
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    for name, path, body in [("estimate", "/api/estimate", form(f)), ("eval", "/api/eval", {"run": "x"})]:
        if tools.command_available(name):
            continue
        r = client.post(path, json=body)
        if name == "eval":
            assert r.status_code == 400        # no such run: named before anything runs
            continue
        assert r.status_code == 501 and f"tunesmith {name}" in r.json()["message"]


def _wait(client, name, states, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = client.get(f"/api/runs/{name}?since=0").json()
        if r["status"] in states:
            return r
        time.sleep(0.5)
    raise AssertionError(f"run {name} still {r['status']} after {timeout} s:\n{r.get('log_tail')}")


@pytest.mark.slow   # three `tunesmith train` processes (each imports torch and transformers): ~1 min here
def test_two_runs_at_once_both_finish_one_stopped_and_resumed(client, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(32))
    a = client.post("/api/runs", json=form(f, {"train.max_steps": "3", "output.dir": str(tmp_path / "runs/a")}))
    b = client.post("/api/runs", json=form(f, {"train.max_steps": "400", "train.save_every": "1",
                                               "output.dir": str(tmp_path / "runs/b")}, method="ia3"))
    assert a.status_code == b.status_code == 200, (a.json(), b.json())
    assert (a.json()["name"], b.json()["name"]) == ("a", "b")
    t0 = time.time()
    while client.get("/api/runs/b?since=0").json()["progress"]["step"] < 2:   # b has a checkpoint: stop it
        assert time.time() - t0 < 180, client.get("/api/runs/b?since=0").json()["log_tail"]
        time.sleep(0.3)
    assert client.post("/api/runs/b/stop").json() == {"stopping": True}
    stopped = _wait(client, "b", {"stopped", "failed"})
    assert stopped["status"] == "stopped" and stopped["resumable"], stopped
    steps_before = stopped["progress"]["step"]
    done_a = _wait(client, "a", {"completed", "failed"})
    assert done_a["status"] == "completed" and done_a["artifact"] == "adapter", done_a["log_tail"]
    assert [m["step"] for m in done_a["metrics"] if m["split"] == "train"] == [1, 2, 3]
    assert done_a["progress"]["total"] == 3 and done_a["progress"]["tokens_per_s"] > 0
    # resume b (to 2 steps past where it stopped): the same run directory, from its checkpoint
    r = client.post("/api/runs/b/resume", json={"overrides": [f"train.max_steps={steps_before + 2}"]})
    assert r.status_code == 200 and r.json()["command"].endswith(f"--resume {tmp_path / 'runs/b'} "
                                                                 f"train.max_steps={steps_before + 2}")
    done_b = _wait(client, "b", {"completed", "failed"})
    assert done_b["status"] == "completed", done_b["log_tail"]
    assert done_b["summary"]["steps"] == steps_before + 2
    listed = {r["name"]: r for r in client.get("/api/runs").json()}
    assert listed["a"]["method"] == "lora" and listed["b"]["method"] == "ia3"
    cmp = client.post("/api/compare", json={"runs": ["a", "b"]}).json()
    assert [r["name"] for r in cmp["runs"]] == ["a", "b"] and all(r["metrics"] for r in cmp["runs"])
    table = cmp["table"]["stdout"].splitlines()   # `tunesmith compare`'s table of the two runs
    assert cmp["table"]["ok"] and table[0].startswith("| method | lr | trainable % |")
    assert table[2].startswith("| `a (lora)` |") and table[3].startswith("| `b (ia3)` |") and "ok" in table[2]
    # export: LoRA goes to vLLM; (IA)³ is refused with the reason, as `tunesmith export` says it
    ok = client.post("/api/export", json={"run": "a", "target": "vllm"}).json()
    assert ok["ok"] and Path(ok["out_dir"], "adapter_config.json").is_file() and "vllm serve" in ok["message"]
    refused = client.post("/api/export", json={"run": "b", "target": "vllm"}).json()
    assert not refused["ok"] and refused["refused"] and "loads only LoRA adapters" in refused["message"]
    merged = client.post("/api/merge", json={"run": "b"}).json()
    assert merged["ok"] and Path(merged["out_dir"], "config.json").is_file(), merged

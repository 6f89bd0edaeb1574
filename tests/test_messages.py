"""Messages and figures that say what they are: method-field errors, errors blamed on the override that
caused them, the step's loss on the progress bar, the summary's labels, resume accounting, the data
line always printed, no stray progress bars or library chatter, and no torch before the config is valid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith
from helpers import run_config, write_jsonl, cls_rows
from tunesmith import cli

SRC = Path(__file__).resolve().parent.parent / "src"


def _yaml(tmp_path, data, method="{name: lora, r: 2}", extra=""):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: 'random:llama', device: cpu}}\nmethod: {method}\n"
                   f"data: {{train: {data}}}\ntrain: {{max_steps: 1, progress: false{extra}}}\n"
                   f"output: {{dir: {tmp_path / 'run'}, plot: false}}\n")
    return cfg


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_misspelled_method_field_lists_the_methods_fields_and_blames_the_override(alpaca_file, tmp_path, capsys):
    cfg = _yaml(tmp_path, alpaca_file)
    assert cli.main(["train", str(cfg), "method.rank=16"]) == 2
    err = _error(capsys)
    assert err.startswith("error: override 'method.rank=16': method.rank: unknown key 'rank' (did you mean 'r'?); "
                          "valid keys for method lora: name, dropout, target_modules, modules_to_save, r, alpha, ")
    assert str(cfg) not in err
    assert cli.main(["train", str(_yaml(tmp_path, alpaca_file, method="{name: lora, rank: 16}"))]) == 2
    assert _error(capsys).startswith(f"error: {cfg}: method.rank: unknown key 'rank' (did you mean 'r'?)")
    assert not (tmp_path / "run").exists()


def test_override_errors_name_the_override_and_file_errors_the_file(alpaca_file, tmp_path, capsys):
    cfg = _yaml(tmp_path, alpaca_file)
    assert cli.main(["train", str(cfg), "train.lr=abc"]) == 2
    assert _error(capsys).startswith("error: override 'train.lr=abc': train.lr: Input should be a valid number")
    bad = _yaml(tmp_path, alpaca_file, extra=", lrr: 1")
    assert cli.main(["train", str(bad), "train.lr=1e-3"]) == 2
    assert _error(capsys).startswith(f"error: {bad}: train.lrr: unknown key 'lrr' (did you mean 'lr'?); "
                                     "valid keys for train: ")
    assert cli.main(["train", str(cfg), "method.name=lorra"]) == 2
    assert _error(capsys).startswith("error: override 'method.name=lorra': method.name: unknown method 'lorra' "
                                     "(did you mean 'lora'?)")
    staged = cfg.with_name("staged.yaml")
    staged.write_text(_yaml(tmp_path, alpaca_file).read_text() + "stages: [{name: one}, {name: two, train: {lrr: 1}}]\n")
    assert cli.main(["train", str(staged)]) == 2
    assert _error(capsys).startswith(f"error: {staged} stages[1] (two): train.lrr: unknown key 'lrr' (did you mean "
                                     "'lr'?)")
    assert cli.main(["train", str(staged), "method.rank=16"]) == 2
    assert _error(capsys).startswith("error: override 'method.rank=16': method.rank: unknown key 'rank' (did you "
                                     "mean 'r'?); valid keys for method lora: ")
    assert not (tmp_path / "run").exists()


def test_strategy_mixture_and_regulariser_errors_name_the_entry_and_its_own_fields(alpaca_file, tmp_path, capsys):
    cfg = _yaml(tmp_path, alpaca_file).read_text()
    cases = {
        "strategies: [{name: ewc, lambdaa: 1}]\n": "strategies[0].lambdaa: unknown key 'lambdaa' (did you mean "
                                                   "'lambda'?); valid keys for strategy ewc: name, lambda, data, ",
        "strategies: [{name: ewcc}]\n": "strategies[0]: unknown strategy 'ewcc' (did you mean 'ewc'?); valid: ",
        f"data: {{mixture: [{{train: {alpaca_file}, task: a, wieght: 2}}]}}\n":
            "data.mixture[0].wieght: unknown key 'wieght' (did you mean 'weight'?); valid keys for data.mixture[0]: "
            "train, validation, task, ",
    }
    for extra, message in cases.items():
        bad = tmp_path / "bad.yaml"
        text = cfg + extra if extra.startswith("strategies") else cfg.replace(f"data: {{train: {alpaca_file}}}\n", extra)
        bad.write_text(text)
        assert cli.main(["train", str(bad)]) == 2
        assert _error(capsys).startswith(f"error: {bad}: {message}")
    bad.write_text(cfg.replace("progress: false", "progress: false, regularize: {neftune: {alpha: -1}}"))
    assert cli.main(["train", str(bad)]) == 2
    assert _error(capsys) == (f"error: {bad}: train.regularize: neftune.alpha: Input should be greater than 0 "
                              "(got -1)")   # said once
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_is_named_with_its_line(alpaca_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(_yaml(tmp_path, alpaca_file).read_bytes().replace(b"progress: false", b"progress: false, "
                                                                      b"note: caf\xe9"))
    assert cli.main(["train", str(bad)]) == 2
    assert _error(capsys) == f"error: {bad}:4: not valid UTF-8 (byte 0xe9 at column 49); re-save the file as UTF-8"
    assert not (tmp_path / "run").exists()


def test_help_methods_and_config_errors_import_no_torch(alpaca_file, tmp_path):
    good = _yaml(tmp_path, alpaca_file)
    bad = good.with_name("bad.yaml")
    bad.write_text(good.read_text().replace("max_steps: 1", "max_steps: 1, lrr: 1"))
    staged = good.with_name("staged.yaml")   # a typo in the second stage of a chained run
    staged.write_text(good.read_text() + "stages: [{name: one}, {name: two, train: {lrr: 1}}]\n")
    probe = (
        "import sys\nfrom tunesmith import cli, config\n"
        "cli.build_parser().format_help()\n"
        "assert cli.main(['methods']) == 0\n"
        f"assert cli.main(['train', {str(bad)!r}]) == 2\n"
        f"assert cli.main(['train', {str(staged)!r}]) == 2\n"
        f"assert cli.main(['estimate', {str(bad)!r}]) == 2\n"
        f"assert cli.main(['train', {str(good)!r}, 'method.rank=2']) == 2\n"
        f"assert config.load({str(good)!r}).method.r == 2\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'matplotlib', 'numpy') if m in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_progress_bar_shows_the_steps_loss_and_the_summary_says_what_its_losses_are(alpaca_file, tmp_path, capsys):
    run_dir, m = tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 2}, max_steps=3,
                                            progress=True))
    captured = capsys.readouterr()
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert f"loss={losses[-1]:.4f}" in captured.err and f"avg10={sum(losses) / 3:.4f}" in captured.err
    assert m["last_step_loss"] == losses[-1] and m["last_steps_n"] == 3
    assert "(the same 4 training batches, before and after training)" in captured.out
    assert f"last step loss     {losses[-1]:.4f}  (mean of the last 3 steps: {sum(losses) / 3:.4f})" in captured.out


def test_the_data_line_is_printed_without_a_progress_bar(alpaca_file, tmp_path, capsys):
    tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 2}, max_steps=1))
    captured = capsys.readouterr()
    assert captured.err.strip() == "data: 48 rows -> 46 train + 2 validation examples; 0 truncated to max_seq_len=64; 0 dropped"
    assert captured.out == ""


def test_resume_counts_time_across_sessions_and_a_finished_run_writes_no_duplicate_probe(alpaca_file, tmp_path, capsys):
    run_dir, first = tunesmith.train(run_config(alpaca_file, tmp_path, {"name": "lora", "r": 2}, max_steps=2,
                                                save_every=1))
    _, resumed = tunesmith.train(None, resume=run_dir, **{"train.max_steps": 4})
    assert resumed["time_s"] > resumed["session_time_s"] and resumed["time_s"] >= resumed["train_time_s"]
    assert resumed["train_time_s"] > first["train_time_s"]
    capsys.readouterr()
    _, again = tunesmith.train(None, resume=run_dir)
    assert "already trained to step 4 of 4; writing its outputs again" in capsys.readouterr().err
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [r["step"] for r in records if r["split"] == "train_probe"]
    assert probes == [0, 4] and again["steps"] == 4 and again["status"] == "completed"
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT encoder saved without a task head (loading it for classification adds one)."""
    from transformers import AutoConfig, AutoModel
    from tunesmith.models.loader import RANDOM_ARCHS, ModelConfig, load_tokenizer
    path = tmp_path_factory.mktemp("bert")
    tok = load_tokenizer(ModelConfig(name_or_path="random:bert"))
    AutoModel.from_config(AutoConfig.for_model(**RANDOM_ARCHS["bert"], vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_no_loading_bar_with_progress_false(bert_dir, tmp_path, capfd):
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows())
    cfg = run_config(data, tmp_path, {"name": "lora", "r": 2}, model=str(bert_dir), max_steps=1)
    tunesmith.train(cfg)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and err.startswith("data: ")


@pytest.mark.slow
def test_the_cli_says_one_line_on_a_quiet_run(bert_dir, tmp_path):
    """A fresh process and a fresh matplotlib config: no font-cache note, no transformers load report."""
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name_or_path: '{bert_dir}', device: cpu}}\nmethod: {{name: lora, r: 2}}\n"
                   f"data: {{train: {data}}}\ntrain: {{max_steps: 1, progress: false}}\n"
                   f"output: {{dir: {tmp_path / 'run'}, plot: true}}\n")
    env = dict(os.environ, PYTHONPATH=str(SRC), MPLCONFIGDIR=str(tmp_path / "mpl"))
    env.pop("TRANSFORMERS_VERBOSITY", None)
    out = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(cfg)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "mpl").is_dir()
    assert out.stdout == "" and out.stderr.splitlines() == [
        "data: 48 rows -> 46 train + 2 validation examples; 0 truncated to max_seq_len=512; 0 dropped"]

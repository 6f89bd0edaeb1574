"""`tunesmith eval` end to end on tiny random models; the metrics recomputed from predictions.jsonl."""
from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as skm

from helpers import alpaca_rows, cls_rows, tiny, write_jsonl
from tunesmith import cli


def read(out):
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return preds, json.loads((out / "results.json").read_text())


def test_generation_rouge_bleu_equal_the_libraries_on_the_saved_predictions(tmp_path, capsys):
    data = write_jsonl(tmp_path / "test.jsonl", alpaca_rows(6))
    out = tmp_path / "gen"
    assert cli.main(["eval", "random:llama", "--data", str(data), "--max-new-tokens", "4", "--batch-size", "4",
                     "--out", str(out), "--no-progress", "--metrics", "rouge,bleu,exact_match,gsm8k"]) == 0
    preds, res = read(out)
    assert res["task"] == "generation" and res["rows"] == 6 and len(preds) == 6
    assert preds[0]["reference"] == alpaca_rows(6)[0]["output"] and preds[0]["prediction"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    r1 = sum(scorer.score(p["reference"], p["prediction"])["rouge1"].fmeasure for p in preds) / 6
    assert res["metrics"]["rouge1"] == pytest.approx(r1)
    bleu = sacrebleu.corpus_bleu([p["prediction"] for p in preds], [[p["reference"] for p in preds]]).score
    assert res["metrics"]["bleu"] == pytest.approx(bleu)
    assert "gsm8k_accuracy" in res["metrics"]
    assert "rouge1" in capsys.readouterr().out


def test_classification_head_metrics_equal_sklearn_and_draw_the_confusion_matrix(tmp_path, capsys):
    model_dir = tmp_path / "bert-cls"
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    tiny("bert", task="classification", num_labels=2).save_pretrained(model_dir)
    load_tokenizer(ModelConfig(name_or_path="random:bert")).save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "cls.jsonl", cls_rows(20))
    out = tmp_path / "cls"
    assert cli.main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--no-progress",
                     "--label-names", "neg,pos"]) == 0
    preds, res = read(out)
    assert res["task"] == "classification" and len(preds) == 20
    y_true, y_pred = [p["label"] for p in preds], [p["prediction"] for p in preds]
    assert set(y_true) <= {"neg", "pos"}
    m = res["metrics"]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=["neg", "pos"], average="macro",
                                                       zero_division=0))
    assert m["recall_micro"] == pytest.approx(skm.recall_score(y_true, y_pred, average="micro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=["neg", "pos"]).tolist()
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "f1_macro" in printed and "confusion matrix" in printed


def test_lm_loss_equals_the_training_evaluation(tmp_path):
    import torch
    from tunesmith.data import DataConfig, build_datasets
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    from tunesmith.train.loop import Batches, evaluate
    from tunesmith.train.objectives import get
    rows = alpaca_rows(8)
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    out = tmp_path / "lm"
    assert cli.main(["eval", "random:llama", "--data", str(data), "--task", "lm", "--out", str(out),
                     "--no-progress", "--batch-size", "3"]) == 0
    preds, res = read(out)
    tok = load_tokenizer(ModelConfig(name_or_path="random:llama"))
    ds, _, _ = build_datasets(DataConfig(train=str(data), val_split=0), tok, max_seq_len=1024, objective="sft", seed=0)
    model = tiny("llama")
    ref = evaluate(model, get("sft"), Batches(ds, 4, 0, tok.pad_token_id or 0, torch.device("cpu")).iterate(),
                   "fp32", torch.device("cpu"))
    assert res["metrics"]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert res["metrics"]["perplexity"] == pytest.approx(torch.tensor(ref["loss"]).exp().item(), rel=1e-5)
    assert sum(p["tokens"] for p in preds) == sum(sum(x != -100 for x in ex["labels"][1:]) for ex in ds.examples)


def test_default_out_keeps_each_task_of_the_same_file_apart(tmp_path, monkeypatch):
    """`--task lm` on alpaca rows writes beside their generation results (-lm), not over them."""
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "held.jsonl", alpaca_rows(3))
    assert cli.main(["eval", "random:llama", "--data", str(data), "--no-progress", "--max-new-tokens", "2"]) == 0
    assert cli.main(["eval", "random:llama", "--data", str(data), "--no-progress", "--task", "lm"]) == 0
    gen, lm = read(tmp_path / "runs/eval/random_llama-held"), read(tmp_path / "runs/eval/random_llama-held-lm")
    assert (gen[1]["task"], lm[1]["task"]) == ("generation", "lm")
    assert "prediction" in gen[0][0] and "loss" in lm[0][0]
    assert cli.main(["eval", "random:llama", "--data", str(data), "--no-progress", "--max-new-tokens", "2",
                     "--metrics", "exact_match"]) == 0
    em = read(tmp_path / "runs/eval/random_llama-held-exact_match")
    assert list(em[1]["metrics"]) == ["exact_match"] and "rouge1" in read(tmp_path / "runs/eval/random_llama-held")[1]["metrics"]


def test_shots_draw_the_same_demonstrations_and_answer_by_generated_label(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", cls_rows(30, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", cls_rows(5, seed=2))
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["eval", "random:llama", "--data", str(test), "--shots", "4", "--shots-from", str(train),
                         "--label-names", "negative,positive", "--out", str(out), "--no-progress"]) == 0
        outs.append(read(out))
    (preds, res), (_, res_b) = outs
    assert res["shots"] == 4 and len(res["demonstrations"]) == 4
    assert res["demonstrations"] == res_b["demonstrations"]          # deterministic draw
    labels = [json.loads(line)["label"] for line in train.read_text().splitlines()]
    drawn = [labels[int(loc.rsplit(":", 1)[1]) - 1] for loc in res["demonstrations"]]
    assert sorted(drawn) == [0, 0, 1, 1]                             # the labels take turns
    assert all("answer" in p and p["prediction"] in (None, "negative", "positive") for p in preds)
    assert res["metrics"]["no_label"] == sum(p["prediction"] is None for p in preds)


@pytest.mark.parametrize("argv, message", [
    (["--task", "summarize"], "--task: unknown task 'summarize'"),
    (["--data", "nope.jsonl"], "--data file not found: 'nope.jsonl'"),
    (["--metrics", "f1"], "metric 'f1' is for classification evaluation, not generation"),
    (["--shots", "2"], "--shots K needs --shots-from TRAIN_FILE"),
    (["--model", "./no/such/run"], "MODEL_OR_RUN './no/such/run' does not exist"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3))
    args = {"--model": "random:llama", "--data": "d.jsonl"}
    extra = []
    for i in range(0, len(argv), 2):
        if argv[i] in args:
            args[argv[i]] = argv[i + 1]
        else:
            extra += argv[i:i + 2]
    code = cli.main(["eval", args["--model"], "--data", args["--data"], "--out", "out", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def pref_rows(n=4):
    return [{"prompt": f"Question {i}: say something.", "chosen": f"A kind answer {i}.", "rejected": "No."}
            for i in range(n)]


def test_preference_rewards_of_a_reward_model_and_the_implicit_reward(tmp_path):
    import torch
    import tunesmith
    from tunesmith.eval.scoring import predict_preference
    from tunesmith.eval.tasks import Inputs
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    tok = load_tokenizer(ModelConfig(name_or_path="random:llama"))
    rm_dir = tmp_path / "rm"
    rm = tiny("llama", task="classification", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id or 0
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    data = write_jsonl(tmp_path / "pref.jsonl", pref_rows())
    out = tmp_path / "pref"
    assert cli.main(["eval", str(rm_dir), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    preds, res = read(out)
    assert res["task"] == "preference" and len(preds) == 4
    hits = sum(p["chosen_reward"] > p["rejected_reward"] for p in preds)
    assert res["metrics"]["reward_accuracy"] == pytest.approx(hits / 4)
    ids = tok(pref_rows()[0]["prompt"] + pref_rows()[0]["chosen"], add_special_tokens=False)["input_ids"]
    assert isinstance(preds[0]["chosen_reward"], float) and len(ids) > 0
    # a LoRA adapter at its zero init: the tuned model is its base, so the implicit reward is 0
    lm = tunesmith.apply(tiny("llama"), "lora", r=2)
    rows = [(f"r:{i}", {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
            for i, r in enumerate(pref_rows(2))]
    recs = predict_preference(Inputs(model=lm, tokenizer=tok, rows=rows, fmt="preference", progress=False))
    assert [r["chosen_reward"] for r in recs] == pytest.approx([0.0, 0.0], abs=1e-5)
    with torch.no_grad():
        for p in lm.parameters():
            if p.requires_grad:
                p.add_(0.05)
    recs = predict_preference(Inputs(model=lm, tokenizer=tok, rows=rows, fmt="preference", progress=False))
    assert all(abs(r["chosen_reward"]) > 1e-4 for r in recs)


def test_generation_eval_of_an_encoder_decoder_goes_through_the_engine(tmp_path):
    """A tiny T5 directory: each row's instruction (+ input) is the source, as seq2seq training reads it;
    the engine's greedy answers equal tunesmith.generate's (transformers' generate)."""
    import torch
    from tunesmith.infer import generate
    from tunesmith.models.loader import ModelConfig, load_tokenizer
    model = tiny("t5", task="seq2seq", seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path / "t5")
    load_tokenizer(ModelConfig(name_or_path="random:t5")).save_pretrained(tmp_path / "t5")
    rows = alpaca_rows(5)
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "gen"
    assert cli.main(["eval", str(tmp_path / "t5"), "--data", str(data), "--max-new-tokens", "4", "--batch-size", "2",
                     "--out", str(out), "--no-progress", "--metrics", "rouge"]) == 0
    preds, res = read(out)
    sources = [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    assert [p["prediction"] for p in preds] == generate(str(tmp_path / "t5"), sources, max_new_tokens=4, device="cpu")
    assert res["rows"] == 5 and "rouge1" in res["metrics"] and all(p["prediction"].strip() for p in preds)

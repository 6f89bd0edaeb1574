"""One DPO optimizer step with LoRA against TRL's DPOTrainer with peft (TRL as a test-only oracle): the
same tiny base, the same adapter weights, the batch TRL tokenized itself, SGD so that the update is the
gradient itself. tunesmith's per-sequence log-probs equal the plain log-softmax of TRL's batch at the same weights, and the
first-step loss, the implicit rewards, the log-probs and every LoRA weight's update agree within fp32
tolerance (TRL in fp32: its config's default bf16 would autocast the forward)."""
from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is the oracle of the preference losses (dev extra)")
datasets = pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset (dev extra)")
from peft import LoraConfig

import tunesmith
from helpers import preference_rows, tiny
from tunesmith.kernels.cross_entropy import IGNORE
from tunesmith.models.loader import ModelConfig, load_tokenizer
from tunesmith.train.objectives.configs.dpo import DPOConfig
from tunesmith.train.objectives._logps import logits_logps
from tunesmith.train.objectives._preference import pair_rows
from tunesmith.train.objectives.dpo import DPO

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETA = 0.5, 0.1
TOL = 1e-5


def _same_adapter(ours, theirs):
    """Random LoRA weights (B ≠ 0: the policy differs from the reference, the adapter disabled) on both."""
    g = torch.Generator().manual_seed(11)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                mine[n.removeprefix("base_model.model.").replace(".default", "")].copy_(p)


def _side(rows, key, pad):
    """TRL's tokenized rows as tunesmith's padded pair side: prompt + response, labels on the response."""
    seqs = [r["prompt_ids"] + r[f"{key}_ids"] for r in rows]
    t = max(map(len, seqs))
    ids = torch.full((len(rows), t), pad)
    labels = torch.full((len(rows), t), IGNORE)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(r["prompt_ids"]):len(s)] = torch.tensor(r[f"{key}_ids"])
    return {f"{key}_input_ids": ids, f"{key}_attention_mask": mask, f"{key}_labels": labels}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_dpo_step_equals_trl_dpo_trainer_with_peft(tmp_path, loss_type):
    from trl import DPOConfig as TRLConfig, DPOTrainer
    tok = load_tokenizer(ModelConfig(name_or_path="random:llama"))
    tok.eos_token = tok.sep_token   # TRL appends the EOS token to plain-text responses
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_rows(4)]
    base = tiny("llama", seed=3)
    ours = tunesmith.apply(copy.deepcopy(base), "lora", r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    args = TRLConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="sgd", max_grad_norm=0.0,
                     beta=BETA, loss_type=[loss_type], max_length=None, gradient_checkpointing=False,
                     use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0)
    # TRL wraps the base itself (a new adapter: its reference is the adapter disabled, as tunesmith's is)
    trainer = DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
    _same_adapter(ours, trainer.model)
    tokenized = list(trainer.train_dataset)
    batch = {**_side(tokenized, "chosen", tok.pad_token_id), **_side(tokenized, "rejected", tok.pad_token_id)}
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}

    # at the same weights, tunesmith's per-sequence log-probs are the plain log-softmax of TRL's batch
    coll = trainer.data_collator(tokenized)
    with torch.no_grad():
        logits = trainer.model(input_ids=coll["input_ids"], attention_mask=coll["attention_mask"]).logits
        token = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, coll["input_ids"][:, 1:, None]).squeeze(2)
        plain = (token * coll["completion_mask"][:, 1:]).sum(1)
        rows, b = pair_rows(batch)
        torch.testing.assert_close(logits_logps(ours, rows, 2 * b)[0], plain, rtol=1e-6, atol=1e-5)
    trainer.train()
    logged = trainer.state.log_history[0]

    objective = DPO(DPOConfig(beta=BETA, loss_type=loss_type))
    ours.train()
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    loss_sum, b, extra = objective.loss(ours, batch)
    (loss_sum / b).backward()
    opt.step()

    for ours_v, key in ((loss_sum / b, "loss"), (extra["rewards/chosen"] / b, "rewards/chosen"),
                        (extra["rewards/rejected"] / b, "rewards/rejected"), (extra["logps/chosen"] / b, "logps/chosen"),
                        (extra["logps/rejected"] / b, "logps/rejected")):
        assert abs(ours_v.item() - logged[key]) <= TOL * max(1.0, abs(logged[key])), (key, ours_v.item(), logged[key])
    theirs_after = {n.removeprefix("base_model.model.").replace(".default", ""): p.detach()
                    for n, p in trainer.model.named_parameters() if "lora_" in n}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            ours_step, theirs_step = p.detach() - before[n], theirs_after[n] - before[n]
            assert ours_step.norm() > 1e-5 * before[n].norm(), n         # the step moved every LoRA weight
            assert (ours_step - theirs_step).norm() <= 10 * TOL * theirs_step.norm(), n

"""Batched response log-probs against a brute-force per-token loop."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_sweep import logprobs
from dpo_sweep.data import Pair, collate
from dpo_sweep.logprobs import sequence_logps, token_logps


def tiny(model_type, tokenizer, **extra):
    """A tiny model of an architecture: llama and phi take the head-only path, gpt2 the generic one."""
    torch.manual_seed(0)
    dims = {"llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
            "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
            "gpt2": dict(n_embd=32, n_layer=2, n_head=2)}[model_type]
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **dims,
                               **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


def brute_force(model, prompt, response):
    """sum_t log p(response_t | prompt + response_<t), one unpadded forward per token."""
    seq = list(prompt) + list(response)
    total = 0.0
    with torch.no_grad():
        for t in range(len(prompt), len(seq)):
            logits = model(input_ids=torch.tensor([seq[:t]])).logits[0, -1].double()
            total += torch.log_softmax(logits, -1)[seq[t]].item()
    return total


def make_pairs(tokenizer):
    texts = [
        ("Sort: 3 1 2\nAnswer: ", "1 2 3", "3 2 1"),
        ("Add: 2+2\nAnswer: ", "4", "22"),
        ("Uppercase: a much longer prompt than the others\nAnswer: ", "A MUCH", "a much longer answer"),
    ]
    pairs = []
    for i, (p, c, r) in enumerate(texts):
        ids = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)  # noqa
        pairs.append(Pair(tuple(tokenizer(p)["input_ids"]), ids(c), ids(r), i))
    return pairs


@pytest.mark.parametrize("model_type", ["llama", "phi", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_brute_force(tokenizer, padding_side, model_type):
    tiny_model = tiny(model_type, tokenizer)
    assert logprobs._uses_head_only(tiny_model) == (model_type != "gpt2")
    pairs = make_pairs(tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id, padding_side)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding to test masking"
    with torch.no_grad():
        logps, counts = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    expected = [brute_force(tiny_model, p.prompt_ids, p.chosen_ids) for p in pairs]
    expected += [brute_force(tiny_model, p.prompt_ids, p.rejected_ids) for p in pairs]
    assert_close(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_prompt_and_padding_do_not_count(tiny_model, tokenizer):
    """Changing the pad id changes nothing; the response log-prob does not include the prompt's."""
    pairs = make_pairs(tokenizer)
    a = collate(pairs, tokenizer.pad_token_id)
    b = collate(pairs, tokenizer.convert_tokens_to_ids("x"))
    with torch.no_grad():
        la, _ = sequence_logps(tiny_model, a["input_ids"], a["attention_mask"], a["loss_mask"])
        lb, _ = sequence_logps(tiny_model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert_close(la, lb, atol=1e-5, rtol=1e-5)
    # A one-token response scores exactly one token: log p(EOS | prompt).
    p = pairs[0]
    single = Pair(p.prompt_ids, (tokenizer.eos_token_id,), p.rejected_ids, 0)
    batch = collate([single], tokenizer.pad_token_id)
    with torch.no_grad():
        logps, counts = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        logits = tiny_model(input_ids=torch.tensor([p.prompt_ids])).logits[0, -1]
    assert counts[0].item() == 1
    assert_close(logps[0], torch.log_softmax(logits, -1)[tokenizer.eos_token_id], atol=1e-5, rtol=1e-5)


def test_gradients_flow_only_through_response_positions(tiny_model, tokenizer):
    pairs = make_pairs(tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id)
    tiny_model.train()
    logps, _ = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    logps.sum().backward()
    assert all(p.grad is not None for p in tiny_model.parameters())


def test_token_logps_chunks_agree():
    torch.manual_seed(0)
    logits = torch.randn(37, 11)
    labels = torch.randint(0, 11, (37,))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    assert_close(token_logps(logits, labels, chunk_size=5), expected)


def test_head_only_path_matches_full_logits_in_value_and_gradient(tokenizer, monkeypatch):
    """Chunked, recomputed head on response positions == log_softmax over full logits."""
    pairs = make_pairs(tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id)
    model = tiny("llama", tokenizer).train()
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 7 * len(tokenizer))  # 7 rows a chunk: many chunks
    fast, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    fast.sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    slow = (per_token * batch["loss_mask"][:, 1:]).sum(-1)
    slow.sum().backward()
    assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert_close(fast_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)

"""Batched response log-probs against a brute-force per-token loop."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_sweep import logprobs
from dpo_sweep.data import Pair, collate, collate_shared
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
    """The gradient of the summed log-probs reaches the final hidden state at exactly the positions
    whose next token is a response token: none at other prompt positions, none at padding."""
    pairs = make_pairs(tokenizer)
    batch = collate(pairs, tokenizer.pad_token_id)
    tiny_model.train()
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output  # (N, T, H)

    handle = tiny_model.get_decoder().norm.register_forward_hook(keep)
    logps, _ = sequence_logps(tiny_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    handle.remove()
    logps.sum().backward()
    reached = captured["hidden"].grad.abs().sum(-1) > 0  # (N, T)
    scoring = torch.zeros_like(reached)
    scoring[:, :-1] = batch["loss_mask"][:, 1:].bool()  # position t scores the token at t + 1
    assert torch.equal(reached, scoring)
    assert (batch["attention_mask"] == 0).any() and not reached[batch["attention_mask"] == 0].any()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


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


def tiny_any(model_type, tokenizer):
    """A tiny model of any decoder type, from its config class's defaults shrunk."""
    torch.manual_seed(0)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **dims)
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = False
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = None
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", sorted(logprobs.HEAD_ONLY_MODELS))
def test_shared_prompt_layout_matches_two_sequences_in_value_and_gradient(tokenizer, model_type):
    """prompt + chosen + rejected in one row (prompt computed once) == the two sequences apart,
    for every model type that takes the shared layout, with a grouped-query attention model."""
    pairs = make_pairs(tokenizer)
    model = tiny_any(model_type, tokenizer).train()
    two = collate(pairs, tokenizer.pad_token_id)
    slow, slow_n = logprobs.batch_logps(model, two)
    slow.sum().backward()
    slow_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert logprobs.enable_prompt_sharing(model) is None
    shared = collate_shared(pairs, tokenizer.pad_token_id)
    assert shared["input_ids"].shape[0] == len(pairs) and shared["input_ids"].numel() < two["input_ids"].numel()
    fast, fast_n = logprobs.batch_logps(model, shared)
    fast.sum().backward()
    assert fast_n.tolist() == slow_n.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert_close(fast, slow, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        assert_close(p.grad, slow_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    # A plain forward of the same model (eval, generation) still gets ordinary masked SDPA.
    with torch.no_grad():
        again, _ = logprobs.batch_logps(model, collate(pairs, tokenizer.pad_token_id, "left"))
    assert_close(again, slow.detach(), atol=1e-4, rtol=1e-5)


def test_shared_prompt_layout_indices(tokenizer):
    pairs = [Pair((1, 10), (20, 2), (30, 31, 2), 0), Pair((1,), (21, 2), (2,), 1)]
    b = collate_shared(pairs, pad_id=0, groups=2)
    assert b["input_ids"].tolist() == [[1, 10, 20, 2, 30, 31, 2], [1, 21, 2, 2, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 1, 0, 0, 0]]
    # Sequences by length: rejected 0 (5), chosen 0 (4), chosen 1 (3), rejected 1 (2); two groups.
    # Rejected 0 skips its chosen tokens; padding repeats the last position.
    assert b["attention_index_0"].tolist() == [[0, 1, 4, 5, 6], [0, 1, 2, 3, 3]]
    assert b["attention_index_1"].tolist() == [[7, 8, 9], [7, 10, 10]]
    assert "attention_index_2" not in b
    # Group outputs end to end: group 0 at 0..9 (rows of 5), group 1 at 10..15 (rows of 3).
    # The prompt takes the chosen sequence's outputs; padding takes its own row's last output
    # (never another row's: packed trials' rows must stay apart, gradients included).
    assert b["merge_index"].tolist() == [[5, 6, 7, 8, 2, 3, 4], [10, 11, 12, 14, 14, 14, 14]]
    # Rejected token 30 is scored by the last prompt position, 31 by 30's position.
    assert b["score_labels"].tolist() == [20, 2, 30, 31, 2, 21, 2, 2]
    assert b["score_index"].tolist() == [1, 2, 1, 4, 5, 7, 8, 7]
    assert b["score_seq"].tolist() == [0, 0, 2, 2, 2, 1, 1, 3]
    assert b["counts"].tolist() == [2, 2, 3, 1]


@pytest.mark.parametrize("groups", [1, 3, 8])
def test_shared_prompt_any_grouping_gives_the_same_logps(tokenizer, groups):
    pairs = make_pairs(tokenizer)
    model = tiny_any("llama", tokenizer).eval()
    with torch.no_grad():
        two, _ = logprobs.batch_logps(model, collate(pairs, tokenizer.pad_token_id))
        logprobs.enable_prompt_sharing(model)
        one, _ = logprobs.batch_logps(model, collate_shared(pairs, tokenizer.pad_token_id, groups=groups))
    assert_close(one, two, atol=1e-4, rtol=1e-5)


def test_prompt_sharing_refuses_other_models(tokenizer):
    assert "gpt2" in logprobs.prompt_sharing_blocker(tiny("gpt2", tokenizer))
    eager = tiny("llama", tokenizer, attn_implementation="eager")
    assert "eager" in logprobs.enable_prompt_sharing(eager)


def test_a_sliding_window_longer_than_every_sequence_does_not_stop_prompt_sharing(tokenizer):
    model = tiny_any("mistral", tokenizer)
    model.config.sliding_window = 96
    assert "window (96) is shorter than train.max_length (128)" in logprobs.prompt_sharing_blocker(model, 128)
    assert "window (96)" in logprobs.prompt_sharing_blocker(model)  # length unknown
    pairs = make_pairs(tokenizer)
    assert max(p.length for p in pairs) <= 96
    with torch.no_grad():
        two, _ = logprobs.batch_logps(model, collate(pairs, tokenizer.pad_token_id))
        assert logprobs.enable_prompt_sharing(model, 96) is None
        one, _ = logprobs.batch_logps(model, collate_shared(pairs, tokenizer.pad_token_id))
    assert_close(one, two, atol=1e-4, rtol=1e-5)


def test_one_decision_on_prompt_sharing_and_its_reason(tokenizer):
    """decide_prompt_sharing is the one place the layout is chosen: off in config, FSDP, a model
    that cannot, a trainer that never takes it, and the shared case; grouping follows the request."""
    llama = tiny_any("llama", tokenizer)
    off = logprobs.decide_prompt_sharing(llama, requested=False)
    assert (off.requested, off.layout, off.reason) == (False, False, "train.share_prompt=false")
    fsdp = logprobs.decide_prompt_sharing(llama, requested=True, fsdp=True)
    assert (fsdp.requested, fsdp.layout) == (True, False) and "FSDP" in fsdp.reason
    trl = logprobs.decide_prompt_sharing(None, requested=True)
    assert (trl.requested, trl.layout) == (True, False)
    gpt2 = logprobs.decide_prompt_sharing(tiny("gpt2", tokenizer), requested=True)
    assert (gpt2.requested, gpt2.layout) == (True, False) and "gpt2" in gpt2.reason
    eager = logprobs.decide_prompt_sharing(tiny("llama", tokenizer, attn_implementation="eager"), requested=True)
    assert not eager.layout and "eager" in eager.reason
    shared = logprobs.decide_prompt_sharing(llama, requested=True, max_length=128)
    assert (shared.requested, shared.layout, shared.reason) == (True, True, None)
    assert not logprobs.shares_prompt(llama)  # deciding changes nothing; applying does
    logprobs.apply_prompt_sharing(llama, gpt2)
    assert not logprobs.shares_prompt(llama)
    logprobs.apply_prompt_sharing(llama, shared)
    assert logprobs.shares_prompt(llama)

"""Multi-token prediction: self-speculative greedy decoding equals plain greedy decoding, the MTP training loss
(against a naive computation) reaches every MTP weight, MTP layers of any count load from the release.
DeepSeek V3 (own embedding and head per module) and MiniMax-M2 (own head, the main model's embedding) both run the
decoding and loss checks; GLM-4.5's are in test_glm4_moe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import BY_NAME
from helpers import randomize, reference, tokens

import hf_archs
from hf_archs.mtp import MTPDrafter, run_mtp_layer, speculative_greedy

CASE = BY_NAME["deepseek_v3"]
GREEDY = {"do_sample": False, "pad_token_id": 0}
# The config field that counts the MTP modules, per architecture (the release's own name).
MTP_FIELD = {"deepseek_v3": "num_nextn_predict_layers", "minimax_m2": "num_mtp_modules"}
archs = pytest.mark.parametrize("name", sorted(MTP_FIELD))


def _model(num_mtp: int = 1, seed: int = 0, name: str = "deepseek_v3") -> torch.nn.Module:
    """A tiny model of architecture `name` with `num_mtp` MTP layers, every weight seeded."""
    official = dict(BY_NAME[name].official_config(), **{MTP_FIELD[name]: num_mtp})
    model = hf_archs.ARCHITECTURES[name].causal_lm_class(hf_archs.config_from_official(official))
    assert len(model.mtp_layers) == num_mtp
    torch.manual_seed(seed)
    model = randomize(model, seed=seed).eval()
    model.set_attn_implementation("eager")
    return model


@archs
@pytest.mark.parametrize("num_mtp", [1, 2])
def test_mtp_speculative_decoding_equals_greedy_token_for_token(name, num_mtp):
    model = _model(num_mtp, name=name)
    ids = tokens(BY_NAME[name], batch=1, length=5)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=20, min_new_tokens=20, **GREEDY)
        fast = model.generate(ids, max_new_tokens=20, min_new_tokens=20, use_mtp=True, **GREEDY)
    assert torch.equal(fast, plain)
    # an EOS (here: the 4th generated token) ends it early, possibly inside a round of accepted drafts
    eos = int(plain[0, 8])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=20, eos_token_id=eos, **GREEDY)
        fast = model.generate(ids, max_new_tokens=20, eos_token_id=eos, use_mtp=True, **GREEDY)
    assert torch.equal(fast, plain) and plain.shape[1] < 5 + 20


@archs
def test_mtp_speculative_decoding_left_padded_batch_equals_greedy(name):
    model = _model(2, seed=1, name=name)
    long, short = tokens(BY_NAME[name], length=9, seed=2)[0], tokens(BY_NAME[name], length=5, seed=3)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, **GREEDY)
        fast = model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, use_mtp=True, **GREEDY)
    assert torch.equal(fast, plain)


def _drafting_model(name: str, num_mtp: int, seed: int = 0) -> torch.nn.Module:
    """A model whose MTP modules draft well, so that drafts are accepted as well as refused: every residual branch
    (attention and MLP outputs) scaled by 0.1, which leaves the main model mostly a bigram model of the current
    token, and each MTP module reading its token's embedding only (eh_proj = [I | 0], embedding first) through the
    main model's final norm and head."""
    model = _model(num_mtp, seed=seed, name=name)
    h = model.config.hidden_size
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(("o_proj.weight", "down_proj", "down_proj.weight")):
                p.mul_(0.1)
        for layer in model.mtp_layers:
            layer.eh_proj.weight.copy_(torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1))
            layer.enorm.weight.fill_(1.0)
            layer.shared_head.norm.weight.copy_(model.model.norm.weight)
            layer.shared_head.head.weight.copy_(model.lm_head.weight)
            if layer.embed_tokens is not None:  # DeepSeek's own copy of the embedding
                layer.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    return model


@archs
@pytest.mark.parametrize("num_mtp", [1, 2])
def test_accepted_and_refused_mtp_drafts_keep_greedy_decoding(name, num_mtp):
    model = _drafting_model(name, num_mtp)
    ids = tokens(BY_NAME[name], length=5)
    stats = {}
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=20, min_new_tokens=20, **GREEDY)
        fast = speculative_greedy(model, ids, MTPDrafter(model), max_new_tokens=20, min_new_tokens=20,
                                  eos_token_id=model.generation_config.eos_token_id, pad_token_id=0, stats=stats)
        via_generate = model.generate(ids, max_new_tokens=20, min_new_tokens=20, use_mtp=True, **GREEDY)
    assert torch.equal(fast, plain) and torch.equal(via_generate, plain)
    rounds = stats["forwards"] - 1  # after the prompt's forward, one per round of drafts
    assert 0 < stats["accepted_drafts"] < rounds * num_mtp, stats  # some drafts accepted, some refused
    assert stats["forwards"] + stats["accepted_drafts"] == 20  # each forward gives one token, each accepted draft one


class OracleDrafter:
    """Drafts the known greedy continuation, wrong at the draft positions listed in `wrong` (exercises acceptance
    of 0..D drafts and the cache cropping)."""

    def __init__(self, target: torch.Tensor, depth: int, wrong: set[int]) -> None:
        self.target, self.depth, self.wrong = target, depth, wrong

    def draft(self, tokens, positions, attention_mask, new_hidden):
        n = tokens.shape[1] - 1
        drafts = self.target[:, n + 1:n + 1 + self.depth].clone()
        drafts = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], self.depth - drafts.shape[1])], dim=1)
        for j in range(self.depth):
            if n + 1 + j in self.wrong:
                drafts[:, j] = (drafts[:, j] + 1) % 128
        return drafts


@pytest.mark.parametrize("wrong", [set(), {8, 9, 13, 17, 18, 19}], ids=["perfect", "partly_wrong"])
def test_speculative_loop_with_oracle_drafts_equals_greedy(wrong):
    model = _model(1)
    ids = tokens(CASE, length=5)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=18, min_new_tokens=18, **GREEDY)
        stats = {}
        fast = speculative_greedy(model, ids, OracleDrafter(plain, 3, wrong), max_new_tokens=18, min_new_tokens=18,
                                  eos_token_id=model.generation_config.eos_token_id, pad_token_id=0, stats=stats)
    assert torch.equal(fast, plain)
    if not wrong:  # 1 token from the prompt, then 4 per forward (3 drafts + 1)
        assert stats["forwards"] == 1 + 17 // 4 + 1 and stats["accepted_drafts"] == 17 - (17 // 4 + 1)
    else:
        assert 0 < stats["accepted_drafts"] < 17 - (17 // 4 + 1)


class RecordingDrafter(MTPDrafter):
    def __init__(self, model):
        super().__init__(model)
        self.rounds = []

    def draft(self, tokens, positions, attention_mask, new_hidden):
        drafts = super().draft(tokens, positions, attention_mask, new_hidden)
        self.rounds.append((tokens.shape[1] - 1, drafts.clone()))
        return drafts


def _mtp_greedy_full(model, seq: torch.Tensor) -> list[torch.Tensor]:
    """Each MTP module's greedy prediction at every position of `seq`, without caches (the training path)."""
    with torch.no_grad():
        hidden = model.model(seq).last_hidden_state
        pos = torch.arange(seq.shape[1])[None]
        out, previous = [], hidden
        for k, layer in enumerate(model.mtp_layers, start=1):
            n = seq.shape[1] - k
            previous = run_mtp_layer(model, k - 1, layer.mtp_embed(seq[:, k:], model.get_input_embeddings()),
                                     previous[:, :n], pos[:, :n], None)
            out.append(layer.mtp_logits(previous, model.lm_head).argmax(-1))
    return out


@archs
def test_mtp_drafts_with_caches_equal_the_uncached_mtp_modules(name):
    model = _model(2, seed=3, name=name)
    ids = tokens(BY_NAME[name], length=6)
    drafter = RecordingDrafter(model)
    with torch.no_grad():
        seq = speculative_greedy(model, ids, drafter, max_new_tokens=16, min_new_tokens=16,
                                 eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    full = _mtp_greedy_full(model, seq)
    checked = 0
    for n, drafts in drafter.rounds:
        # module 1 at position n - 1 reads verified inputs only; module 2 also reads draft 1 (token n + 1)
        assert drafts[0, 0] == full[0][0, n - 1]
        checked += 1
        if n + 1 < seq.shape[1] and drafts[0, 0] == seq[0, n + 1]:
            assert drafts[0, 1] == full[1][0, n - 1]
    assert checked == len(drafter.rounds) > 3


# Parameters the MTP modules must hold and train: the MTP-only ones, and some of their decoder layer's.
MTP_PARAMS = {
    "deepseek_v3": {"enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
                    "shared_head.head.weight", "self_attn.kv_b_proj.weight", "mlp.experts.gate_up_proj"},
    "minimax_m2": {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "self_attn.q_norm.weight", "block_sparse_moe.gate.weight",
                   "block_sparse_moe.experts.gate_up_proj"},
}


@archs
def test_mtp_loss_matches_a_naive_computation_and_reaches_every_mtp_weight(name):
    model = _model(2, name=name).train()
    ids = tokens(BY_NAME[name], batch=2)
    labels = ids.clone()
    labels[0, -3:] = -100
    out = model(ids, labels=labels)
    plain = model(ids, labels=labels, mtp_loss_weight=0.0)
    w = model.config.mtp_loss_weight
    assert w > 0 and out.mtp_loss is not None and "mtp_loss" not in plain and plain.hidden_states is None
    torch.testing.assert_close(out.loss, plain.loss + w * out.mtp_loss)
    # naive: module k at position i reads h_{k-1}[i] and token i + k, predicts token i + k + 1
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        losses, previous = [], hidden
        for k, layer in enumerate(model.mtp_layers, start=1):
            T = ids.shape[1]
            embedding = model.model.embed_tokens if name == "minimax_m2" else layer.embed_tokens  # main / own
            e = layer.enorm(embedding(ids[:, k:]))
            h = layer.hnorm(previous[:, : T - k])
            x = layer.eh_proj(torch.cat([e, h], dim=-1))
            cos, sin = model.model.rotary_emb["default"](x, torch.arange(T - k)[None])
            causal = torch.full((T - k, T - k), torch.finfo(torch.float32).min).triu(1)[None, None]
            previous = layer(x, (cos, sin), causal)
            logits = layer.shared_head.head(layer.shared_head.norm(previous))  # [b, T - k, V]
            target = labels[:, k + 1:]  # token i + k + 1 for i < T - k - 1
            losses.append(F.cross_entropy(logits[:, : T - k - 1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          ignore_index=-100))
    torch.testing.assert_close(out.mtp_loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)

    out.loss.backward()
    n = model.config.num_hidden_layers
    mtp_params = [(key, p) for key, p in model.named_parameters()
                  if key.startswith((f"model.layers.{n}.", f"model.layers.{n + 1}."))]
    held = {key.split(".", 3)[3] for key, _ in mtp_params}
    assert held >= MTP_PARAMS[name]
    assert ("embed_tokens.weight" in held) == (name == "deepseek_v3")  # MiniMax-M2's modules hold no embedding
    no_grad = [key for key, p in mtp_params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"MTP parameters without gradient: {no_grad}"
    # in eval mode the MTP loss is off unless asked for
    model.eval()
    with torch.no_grad():
        assert "mtp_loss" not in model(ids, labels=labels)
        assert model(ids, labels=labels, mtp_loss_weight=0.5).mtp_loss is not None


def test_mtp_layers_of_any_count_load_from_the_release(tmp_path):
    from case_deepseek_v3 import (  # here: `cases` (imported above) imports it first
        mtp_state,
        write_release,
    )

    official = dict(CASE.official_config(), num_nextn_predict_layers=2)
    ref = reference(CASE)
    write_release(ref, official, tmp_path)
    model = hf_archs.from_official(tmp_path)
    n = official["num_hidden_layers"]
    assert len(model.model.layers) == n + 2
    expected = mtp_state(official)
    for name in (f"model.layers.{n}.eh_proj.weight", f"model.layers.{n + 1}.shared_head.head.weight",
                 f"model.layers.{n + 1}.mlp.experts.gate_up_proj",
                 f"model.layers.{n}.mlp.gate.e_score_correction_bias"):
        assert torch.equal(model.state_dict()[name], expected[name]), name
    # a release without them is refused by name (nothing is silently random)
    official["num_nextn_predict_layers"] = 3
    (tmp_path / "config.json").write_text(__import__("json").dumps(official))
    with pytest.raises(hf_archs.CheckpointError, match=rf"missing tensors: .*model\.layers\.{n + 2}\."):
        hf_archs.from_official(tmp_path)


def test_generate_use_mtp_refuses_sampling():
    model = _model(1)
    with pytest.raises(ValueError, match="greedy decoding only; unsupported here: \\['do_sample'\\]"):
        model.generate(tokens(CASE, length=4), max_new_tokens=3, do_sample=True, use_mtp=True)

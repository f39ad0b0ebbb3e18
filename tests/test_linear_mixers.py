"""The token-mixer contract both linear-attention layers keep (Gated DeltaNet, KDA): every path agrees, decoding from
the cache equals the full forward with a state of constant size, left padding and packed documents are exact."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

from hf_archs.layers.gated_deltanet import GatedDeltaNet
from hf_archs.layers.kda import KimiDeltaAttention


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    assert a.shape == b.shape
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, f"max relative difference {err:.2e} > {tol:.0e}"


def fresh_cache() -> Cache:
    return Cache(layers=[LinearAttentionLayer()])


BUILDERS = {
    "gated_deltanet": lambda chunk_size, mode: GatedDeltaNet(
        hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, layer_idx=0,
        chunk_size=chunk_size, mode=mode),
    "kda": lambda chunk_size, mode: KimiDeltaAttention(
        hidden_size=32, num_heads=2, head_dim=8, layer_idx=0, chunk_size=chunk_size, mode=mode),
}
# The cache holds only the conv inputs (q, k, v channels x kernel 4) and the fp32 state: constant in the length.
CACHE_SHAPES = {"gated_deltanet": ((2, 64, 4), (2, 4, 8, 8)), "kda": ((2, 3 * 16, 4), (2, 2, 8, 8))}


def mixer(kind: str, mode: str = "auto", chunk_size: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = BUILDERS[kind](chunk_size, mode)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.eval()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_mixer_paths_agree(kind):
    x = torch.randn(2, 30, 32)
    with torch.no_grad():
        ref = mixer(kind, "naive")(x)
        for mode in ("chunk", "recurrent"):
            close(mixer(kind, mode)(x), ref)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("prefill", [1, 5, 6, 8, 19, 21])
def test_mixer_decoding_from_cache_equals_full_forward(kind, prefill):
    layer = mixer(kind, chunk_size=4)
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        full = layer(x)
        cache = fresh_cache()
        outs = [layer(x[:, :prefill], cache=cache)]
        state_shapes = (cache.layers[0].conv_states[0].shape, cache.layers[0].recurrent_states[0].shape)
        t = prefill
        for step in (1, 1, 3, 1, 7):  # single tokens (recurrent path) and short chunks (chunked, from a state)
            outs.append(layer(x[:, t:t + step], cache=cache))
            t += step
        outs.append(layer(x[:, t:], cache=cache))
    close(torch.cat(outs, dim=1), full)
    assert state_shapes == tuple(torch.Size(s) for s in CACHE_SHAPES[kind])
    assert cache.layers[0].conv_states[0].shape == state_shapes[0]
    assert cache.layers[0].recurrent_states[0].shape == state_shapes[1]
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_mixer_left_padding_is_exact(kind):
    layer = mixer(kind)
    x = torch.randn(2, 20, 32)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        batch = layer(x, attention_mask=mask)
        alone = layer(x[1:, 7:])
    close(batch[1, 7:], alone[0], 1e-5)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_packed_documents_equal_each_alone(kind):
    layer = mixer(kind, chunk_size=4)
    x = torch.randn(1, 25, 32)
    lengths = [6, 11, 8]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = layer(x, position_ids=position_ids)
        alone = torch.cat([layer(part) for part in x.split(lengths, dim=1)], dim=1)
        by_cu = layer(x, cu_seq_lens_q=torch.tensor([0, 6, 17, 25]))
        cache = fresh_cache()
        layer(x, position_ids=position_ids, cache=cache)
        last_doc_cache = fresh_cache()
        layer(x[:, 17:], cache=last_doc_cache)
    close(packed, alone, 1e-5)
    close(by_cu, alone, 1e-5)
    # a cache filled by a packed row continues its last document
    close(cache.layers[0].recurrent_states[0], last_doc_cache.layers[0].recurrent_states[0], 1e-5)
    close(cache.layers[0].conv_states[0], last_doc_cache.layers[0].conv_states[0], 0)
    # packed rows of different layouts in one batch
    x2 = torch.randn(2, 12, 32)
    pos2 = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    with torch.no_grad():
        both = layer(x2, position_ids=pos2)
        close(both[0, :5], layer(x2[:1, :5])[0], 1e-5)
        close(both[0, 5:], layer(x2[:1, 5:])[0], 1e-5)
        close(both[1], layer(x2[1:])[0], 1e-5)

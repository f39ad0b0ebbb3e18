"""SmolLM3: tiny release in the official layout (model_type "smollm3"), with NoPE layers among the 4."""

from cases import TINY, Case, _from_transformers

CASE = Case(
    name="smollm3",
    # no_rope_layer_interval 2: layers 1 and 3 are NoPE, 0 and 2 use RoPE (the 3B: every 4th layer is NoPE).
    official=dict(TINY, model_type="smollm3", architectures=["SmolLM3ForCausalLM"], rope_theta=10000.0,
                  no_rope_layer_interval=2, use_sliding_window=False, sliding_window=None, attention_bias=False,
                  mlp_bias=False, tie_word_embeddings=True),
    reference=_from_transformers("SmolLM3Config", "SmolLM3ForCausalLM"),
    head_dim_given=False,
)

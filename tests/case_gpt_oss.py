"""gpt-oss: a tiny `gpt_oss` release in the Hub's HF layout with unquantized experts (as transformers'
save_pretrained writes a bf16 / fp32 model), against transformers' GptOssForCausalLM run eagerly.

The shape of openai/gpt-oss-120b's config.json: legacy `rope_theta` + `rope_scaling` (YaRN x32 from 4096, beta
32 / 1, no truncation), the window on even layers, biases, q wider than hidden (4 x 32 > 64), untied head, and the
extra keys the Hub file carries (`experts_per_token`, `initial_context_length`).
Source of the shape: https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json
"""

from cases import TINY, Case, _from_transformers

CASE = Case(
    name="gpt_oss",
    official=dict(TINY, model_type="gpt_oss", architectures=["GptOssForCausalLM"], head_dim=32, intermediate_size=32,
                  num_local_experts=8, num_experts_per_tok=2, experts_per_token=2, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2, attention_bias=True,
                  rope_theta=150000.0, initial_context_length=4096,
                  rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096},
                  swiglu_limit=7.0, router_aux_loss_coef=0.9, hidden_act="silu", tie_word_embeddings=False),
    reference=_from_transformers("GptOssConfig", "GptOssForCausalLM"),
)

from cases import TINY, Case, _from_transformers

CASE = Case(
    name="qwen3_moe",
    official=dict(TINY, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=16,
                  rope_theta=10000.0, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False),
    reference=_from_transformers("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
)

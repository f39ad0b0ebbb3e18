"""OLMo 2: tiny release in the official layout (model_type "olmo2"): post-norm, QK-norm across heads, GQA."""

from cases import TINY, Case, _from_transformers

CASE = Case(
    name="olmo2",
    official=dict(TINY, model_type="olmo2", architectures=["Olmo2ForCausalLM"], rope_theta=500000.0,
                  attention_bias=False, tie_word_embeddings=False),
    reference=_from_transformers("Olmo2Config", "Olmo2ForCausalLM"),
    head_dim_given=False,
    layer_types_field=False,  # the release's config.json has no layer_types; our config builds it
)

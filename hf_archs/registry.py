"""The one table: architecture -> config / model classes, the official model_types it accepts, load rules."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FuseExperts:
    """Per-expert release tensors `<experts>.<e>.<source>` fused into our 3-D parameter `<experts>.<target>`.

    Each expert's sources (nn.Linear weights, [out, in]) are concatenated along dim 0 in the order given, then the
    experts are stacked: [E, sum(out), in]; `transposed=True` stores each expert as [in, sum(out)] instead
    (in-major layouts). Saving through `save_pretrained` writes the per-expert layout back (transformers'
    conversion mapping, registered for our model_type from the same declaration) unless `save_per_expert=False`.
    """

    sources: tuple[str, ...]  # e.g. ("gate_proj.weight", "up_proj.weight")
    target: str  # e.g. "gate_up_proj"
    transposed: bool = False
    # The experts module's name inside a layer. transformers' conversion patterns are regexes matched anywhere in a
    # key, and `.experts.down_proj` would also match `shared_experts.down_proj`: the parent name keeps them apart.
    module: str = "mlp.experts"
    # False where the fused layout is itself the official one and only some releases are per expert (Llama 4: the
    # bf16 releases are fused, Maverick-FP8 per expert): the rule fuses at load (`from_official`, `hf-archs
    # convert`) but is not registered with transformers, so `save_pretrained` / `export` keep the fused layout.
    save_per_expert: bool = True


@dataclass(frozen=True)
class Architecture:
    """One architecture and how its official releases map onto it.

    `key_renames`: (regex, replacement) pairs tried in order on every tensor name of a release; the first that
    matches is applied (once).
    `skip_keys`: (official prefix, reason) for tensors deliberately not loaded (a vision tower, say); a `*`
    component of the prefix stands for any one name component (`model.layers.*.embed_tokens.`). Where the
    architecture has `optional_mtp`, no rule skips a name under one of the decoder's own layers (those rules are
    for the MTP layers; such a tensor under a decoder layer is unexpected).
    `optional_mtp`: (layer prefix, config field) where the config declares MTP modules kept after the decoder
    (`<prefix><num_hidden_layers + k>.*`) that a release may leave out: a release storing no tensor under
    `<prefix><i>.` for any i >= num_hidden_layers loads with the field set to 0 (logged); one storing any of them
    loads them strictly, as every tensor.
    `fuse_experts`: per-expert release tensors fused into our 3-D expert parameters.
    `formats`: release formats (conversion/formats.py) besides HF layout that this architecture is shipped in.
    `text_config_key`: where a multimodal release keeps the decoder's config inside config.json.
    """

    name: str
    module: str  # hf_archs.models.<module>
    config: str
    model: str
    causal_lm: str
    official_model_types: tuple[str, ...]
    text_config_key: str | None = None
    key_renames: tuple[tuple[str, str], ...] = ()
    skip_keys: tuple[tuple[str, str], ...] = ()
    optional_mtp: tuple[str, str] | None = None
    fuse_experts: tuple[FuseExperts, ...] = ()
    # Names (last component) of tensors whose quantized storage is [.., out, in] but which this architecture
    # keeps as [.., in, out] (gpt-oss's MXFP4 experts): transposed after dequantization.
    dequant_transposed: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    # `architectures` entries of releases whose model_type cannot identify them (Grok 2.5 says "git").
    official_architectures: tuple[str, ...] = ()
    # (model_type, architecture) of the official text-only CausalLM layout, where it differs from the release's.
    export_as: tuple[str, str] | None = None
    notes: str = ""
    _classes: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def model_type(self) -> str:
        return "hfa_" + self.name

    @property
    def export_model_type(self) -> str:
        """The official model_type of the text decoder as a plain CausalLM (for `hf-archs export`)."""
        if self.export_as:
            return self.export_as[0]
        return self.official_model_types[0] if self.official_model_types else self.model_type

    @property
    def export_architecture(self) -> str:
        return self.export_as[1] if self.export_as else self.causal_lm.removeprefix("Hfa")

    def _load(self, attr: str):
        if attr not in self._classes:
            mod = importlib.import_module(f"hf_archs.models.{self.module}")
            self._classes[attr] = getattr(mod, getattr(self, attr))
        return self._classes[attr]

    @property
    def config_class(self):
        return self._load("config")

    @property
    def model_class(self):
        return self._load("model")

    @property
    def causal_lm_class(self):
        return self._load("causal_lm")


_VISION = "vision tower: hf_archs loads the text decoder only"
_PROJECTOR = "multimodal projector: hf_archs loads the text decoder only"
# Multimodal releases keep the text decoder under a prefix: `language_model.model.*` on the Hub files,
# `model.language_model.*` when transformers >= 5 saves them.
_MULTIMODAL_TEXT = ((r"^language_model\.model\.", "model."), (r"^language_model\.lm_head\.", "lm_head."),
                    (r"^model\.language_model\.", "model."))
# The common per-expert layout (Qwen3-MoE, DeepSeek V3, GLM-4.5, ...): experts.<e>.{gate,up,down}_proj.weight.
SWIGLU_EXPERTS = (FuseExperts(("gate_proj.weight", "up_proj.weight"), "gate_up_proj"),
                  FuseExperts(("down_proj.weight",), "down_proj"))
# Mixtral's per-expert names under `block_sparse_moe` (MiniMax-M2, Grok 2.5): w1 = gate, w3 = up, w2 = down.
_W1_W3_W2_EXPERTS = (FuseExperts(("w1.weight", "w3.weight"), "gate_up_proj", module="block_sparse_moe.experts"),
                     FuseExperts(("w2.weight",), "down_proj", module="block_sparse_moe.experts"))
# Llama-4-Maverick-FP8 (compressed-tensors): `feed_forward.experts.<e>.{gate,up,down}_proj.weight`, [out, in] each
# (the OFFLINE_QUANT_COMPATIBLE branch of transformers' convert_llama4_weights_to_hf.py), into our input-major
# `gate_up_proj` [E, H, 2I] (= [gate; up] transposed) and `down_proj` [E, I, H].
_LLAMA4_PER_EXPERT = (FuseExperts(("gate_proj.weight", "up_proj.weight"), "gate_up_proj", transposed=True,
                                  module="feed_forward.experts", save_per_expert=False),
                      FuseExperts(("down_proj.weight",), "down_proj", transposed=True, module="feed_forward.experts",
                                  save_per_expert=False))
_MULTIMODAL_TOWERS = (("vision_tower.", _VISION), ("model.vision_tower.", _VISION),
                      ("multi_modal_projector.", _PROJECTOR), ("model.multi_modal_projector.", _PROJECTOR))

# Gemma 3n: the text decoder is under `model.language_model.` (the release was written by transformers >= 4.53);
# beside it an audio tower, a vision tower (timm MobileNet-V5) and one embedder for each. The E2B and E4B files also
# keep k/v projections and k norms for their KV-shared layers (20-34 in both), which read an earlier layer's keys and
# values and have none of their own (transformers >= 5 neither builds nor writes them).
_AUDIO = "audio tower: hf_archs loads the text decoder only"
_GEMMA3N_TEXT = ((r"^model\.language_model\.", "model."),)
_GEMMA3N_KV_SHARED = "unused k/v projection of a KV-shared layer (it reuses an earlier layer's keys and values)"
_GEMMA3N_TOWERS = (("model.vision_tower.", _VISION), ("model.audio_tower.", _AUDIO),
                   ("model.embed_vision.", "vision embedder: hf_archs loads the text decoder only"),
                   ("model.embed_audio.", "audio embedder: hf_archs loads the text decoder only"),
                   *((f"model.language_model.layers.{i}.self_attn.{name}.", _GEMMA3N_KV_SHARED)
                     for i in range(20, 35) for name in ("k_proj", "v_proj", "k_norm")))

_MTP_EMBEDDING_COPY = "a copy of the main embedding stored under an MTP layer: the MTP modules read the main model's"

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture("qwen3", "qwen3", "HfaQwen3Config", "HfaQwen3Model", "HfaQwen3ForCausalLM", ("qwen3",)),
    Architecture("qwen3_moe", "qwen3_moe", "HfaQwen3MoeConfig", "HfaQwen3MoeModel", "HfaQwen3MoeForCausalLM",
                 ("qwen3_moe",), fuse_experts=SWIGLU_EXPERTS),
    Architecture("smollm3", "smollm3", "HfaSmolLM3Config", "HfaSmolLM3Model", "HfaSmolLM3ForCausalLM", ("smollm3",)),
    Architecture("olmo2", "olmo2", "HfaOlmo2Config", "HfaOlmo2Model", "HfaOlmo2ForCausalLM", ("olmo2",)),
    Architecture("mistral3", "mistral3", "HfaMistral3Config", "HfaMistral3Model", "HfaMistral3ForCausalLM",
                 ("mistral3", "mistral"), text_config_key="text_config",
                 key_renames=_MULTIMODAL_TEXT, skip_keys=_MULTIMODAL_TOWERS,
                 export_as=("mistral", "MistralForCausalLM")),
    Architecture("gemma3", "gemma3", "HfaGemma3Config", "HfaGemma3Model", "HfaGemma3ForCausalLM",
                 ("gemma3", "gemma3_text"), text_config_key="text_config",
                 key_renames=_MULTIMODAL_TEXT, skip_keys=_MULTIMODAL_TOWERS,
                 export_as=("gemma3_text", "Gemma3ForCausalLM")),
    # Llama 4's bf16 releases keep fused input-major experts, as ours; Maverick-FP8 keeps them per expert, [out, in]
    # (fused at load, saved fused). Its vision tower is `vision_model.`.
    Architecture("llama4", "llama4", "HfaLlama4Config", "HfaLlama4Model", "HfaLlama4ForCausalLM",
                 ("llama4", "llama4_text"), text_config_key="text_config", key_renames=_MULTIMODAL_TEXT,
                 skip_keys=_MULTIMODAL_TOWERS + (("vision_model.", _VISION), ("model.vision_model.", _VISION)),
                 fuse_experts=_LLAMA4_PER_EXPERT),
    Architecture("gpt_oss", "gpt_oss", "HfaGptOssConfig", "HfaGptOssModel", "HfaGptOssForCausalLM", ("gpt_oss",),
                 dequant_transposed=("gate_up_proj", "down_proj"),
                 notes="the Hub root's experts are MXFP4 along the input dim: dequantized, then [E, in, out]"),
    # Grok 2.5's config.json says model_type "git", which is transformers' GIT captioner: not claimed here (no
    # official model_type). Its releases say `architectures: ["Grok1ForCausalLM"]`; converted ones "hfa_grok2".
    Architecture("grok2", "grok2", "HfaGrok2Config", "HfaGrok2Model", "HfaGrok2ForCausalLM", (),
                 official_architectures=("Grok1ForCausalLM",),
                 fuse_experts=_W1_W3_W2_EXPERTS,
                 notes="release model_type 'git' clashes with transformers' GIT: detect by architectures"),
    Architecture("gemma3n", "gemma3n", "HfaGemma3nConfig", "HfaGemma3nModel", "HfaGemma3nForCausalLM",
                 ("gemma3n", "gemma3n_text"), text_config_key="text_config",
                 key_renames=_GEMMA3N_TEXT, skip_keys=_GEMMA3N_TOWERS,
                 export_as=("gemma3n_text", "Gemma3nForCausalLM")),
    # GLM-4.5 / Air: the MTP layer `model.layers.<num_hidden_layers>.*` is loaded (our model keeps it there).
    Architecture("glm4_moe", "glm4_moe", "HfaGlm4MoeConfig", "HfaGlm4MoeModel", "HfaGlm4MoeForCausalLM",
                 ("glm4_moe",), fuse_experts=SWIGLU_EXPERTS),
    # MiniMax-M2: the config declares `num_mtp_modules` (3) MTP modules at `model.layers.<num_hidden_layers + k>.*`,
    # with the inner names of RBLN-SW/vllm-rbln's vllm_rbln/models/minimax_m2_mtp.py (DeepSeek's recipe on a
    # MiniMax-M2 decoder layer). MiniMax publishes no trained MTP weights (the official weight map has layers 0-61
    # only: MiniMax-AI/MiniMax-M2#47, sgl-project/sglang#13981), so such a release loads with num_mtp_modules=0;
    # one that stores them loads them strictly. An `embed_tokens` a release keeps under an MTP layer (vllm-rbln:
    # under the first one) is a copy of the main embedding, which our MTP modules read. (SGLang's
    # minimax_m2_nextn.py reads another layout, `mtp_layers.<i>`; no release in either layout is known.)
    Architecture("minimax_m2", "minimax_m2", "HfaMiniMaxM2Config", "HfaMiniMaxM2Model", "HfaMiniMaxM2ForCausalLM",
                 ("minimax_m2",), fuse_experts=_W1_W3_W2_EXPERTS,
                 skip_keys=(("model.layers.*.embed_tokens.", _MTP_EMBEDDING_COPY),),
                 optional_mtp=("model.layers.", "num_mtp_modules"),
                 notes="the only release is block-FP8 and stores no MTP modules: dequantized at load, "
                       "num_mtp_modules set to 0"),
    # DeepSeek V3 / R1 and Kimi K2 (the same architecture; K2's releases say model_type kimi_k2 and get K2's
    # defaults). The MTP layers `model.layers.<num_hidden_layers + k>.*` are loaded: our model keeps them there.
    Architecture("deepseek_v3", "deepseek_v3", "HfaDeepseekV3Config", "HfaDeepseekV3Model",
                 "HfaDeepseekV3ForCausalLM", ("deepseek_v3",), fuse_experts=SWIGLU_EXPERTS,
                 notes="the official releases are block-FP8: refused by their quantization_config until dequantized"),
    Architecture("kimi_k2", "kimi_k2", "HfaKimiK2Config", "HfaKimiK2Model", "HfaKimiK2ForCausalLM", ("kimi_k2",),
                 fuse_experts=SWIGLU_EXPERTS,
                 notes="K2 / K2-0905 are block-FP8, K2-Thinking INT4 experts: refused until dequantized"),
    # Qwen3-Next: the release's one MTP layer `mtp.*` (shared fc and norms around `mtp.layers.0`) is held as
    # `mtp.layers.0` with hf_archs/mtp.py's names. Kimi Linear: per-expert w1 / w3 / w2 (gate / up / down).
    Architecture("qwen3_next", "qwen3_next", "HfaQwen3NextConfig", "HfaQwen3NextModel", "HfaQwen3NextForCausalLM",
                 ("qwen3_next",), fuse_experts=SWIGLU_EXPERTS,
                 key_renames=((r"^mtp\.fc\.", "mtp.layers.0.eh_proj."),
                              (r"^mtp\.pre_fc_norm_embedding\.", "mtp.layers.0.enorm."),
                              (r"^mtp\.pre_fc_norm_hidden\.", "mtp.layers.0.hnorm."),
                              (r"^mtp\.norm\.", "mtp.layers.0.shared_head.norm.")),
                 notes="the -FP8 releases are block-FP8: dequantized at load"),
    Architecture("kimi_linear", "kimi_linear", "HfaKimiLinearConfig", "HfaKimiLinearModel", "HfaKimiLinearForCausalLM",
                 ("kimi_linear",), fuse_experts=_W1_W3_W2_EXPERTS),
]}


def by_official_model_type(model_type: str) -> Architecture:
    """The architecture that loads releases whose config.json says `model_type`."""
    for arch in ARCHITECTURES.values():
        if model_type == arch.model_type or model_type in arch.official_model_types:
            return arch
    known = sorted({t for a in ARCHITECTURES.values() for t in (a.model_type, *a.official_model_types)})
    raise ValueError(f"model_type {model_type!r} is not supported by hf_archs; supported: {known}")


def expert_conversions(rules: tuple[FuseExperts, ...]) -> list:
    """The same fusions as transformers `WeightConverter`s, so `from_pretrained` fuses per-expert checkpoints and
    `save_pretrained` writes them back per expert."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose, WeightConverter

    converters = []
    for rule in (r for r in rules if r.save_per_expert):
        ops = [MergeModulelist(dim=0)] + ([Concatenate(dim=1)] if len(rule.sources) > 1 else [])
        ops += [Transpose(1, 2)] if rule.transposed else []
        converters.append(WeightConverter(source_patterns=[f"{rule.module}.*.{s}" for s in rule.sources],
                                          target_patterns=f"{rule.module}.{rule.target}", operations=ops))
    return converters


def by_official_config(official: dict) -> Architecture:
    """The architecture of a release's config.json: by `architectures` where a release's model_type is ambiguous
    (declared per architecture), else by model_type."""
    for name in official.get("architectures") or ():
        for arch in ARCHITECTURES.values():
            if name in arch.official_architectures:
                return arch
    return by_official_model_type(official.get("model_type", ""))


def register_all() -> list[str]:
    """Register every architecture with AutoConfig / AutoModel / AutoModelForCausalLM under `hfa_<name>`.

    Never replaces one of transformers' own types, and never raises: a failure is logged and skipped.
    Returns the names that failed.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    failed = []
    for arch in ARCHITECTURES.values():
        try:
            config_class = arch.config_class
            if arch.model_type in CONFIG_MAPPING:
                if CONFIG_MAPPING[arch.model_type] is not config_class:
                    raise RuntimeError(f"model_type {arch.model_type!r} is already registered by another package")
                continue
            AutoConfig.register(arch.model_type, config_class)
            if any(rule.save_per_expert for rule in arch.fuse_experts):
                register_checkpoint_conversion_mapping(arch.model_type, expert_conversions(arch.fuse_experts))
            AutoModel.register(config_class, arch.model_class)
            AutoModelForCausalLM.register(config_class, arch.causal_lm_class)
        except Exception as err:  # noqa: BLE001 - importing hf_archs must never fail
            logger.warning("hf_archs: could not register %s: %s", arch.name, err)
            failed.append(arch.name)
    return failed

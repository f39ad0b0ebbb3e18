"""The tour (the README's main job): every registered architecture, tiny, end to end; then the flagships compared.

For each architecture a tiny model keeps its flagship's layout (every layer type, the MoE / MLA / linear-attention
blocks, the per-layer plans) at toy sizes, and is
    built -> saved -> loaded back through AutoModelForCausalLM (logits must match exactly) -> made to generate ->
    evaluated (perplexity on text shipped with the package) -> given a few LoRA steps (peft) -> evaluated again.
Then every preset of the toured architectures is compared (`hf_archs.compare`) and a report folder is written:
report.md, the PNG plots and summary.json. No download: the text is tokenised as bytes into the tiny vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .registry import ARCHITECTURES, Architecture

# Sizes for a tiny model; everything else (layer pattern, norms, RoPE, routing rules) stays the flagship's.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, vocab_size=512,
            num_hidden_layers=6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_WINDOW = 8  # sliding windows and attention chunks: shorter than the tour's sequences
TINY_EXPERTS = 8
# More official size fields, shrunk when the flagship sets them (None and 0 stay: they switch a block off).
TINY_SIZES = dict(intermediate_size_mlp=128, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                  shared_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
                  hidden_size_per_layer_input=16, vocab_size_per_layer_input=512, laurel_rank=8)
EXPERT_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token")

SPECIAL_IDS = 3  # 0 pad, 1 bos, 2 eos; byte b is token 3 + b


# ------------------------------------------------------------------------------------------------------------------
# Tiny configs
# ------------------------------------------------------------------------------------------------------------------
def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shrink_linear_attn_config(value: dict, n_layers: int) -> dict:
    """A `linear_attn_config` dict (1-based layer lists) at tiny sizes, keeping the layers below `n_layers`."""
    out = dict(value, head_dim=16, num_heads=4)
    for key, layers in value.items():
        if key.endswith("_layers") and isinstance(layers, list):
            out[key] = [i for i in layers if i <= n_layers]
    return out


def tiny_config(arch: Architecture, **overrides: Any):
    """The architecture's flagship config (its config class defaults), shrunk to TINY sizes.

    Shrinks the official size fields it knows (TINY, TINY_SIZES, experts, heads, windows); per-layer lists that
    are defaults of the class are cut to the first TINY layers, derived ones are derived again by the class.
    Raises ValueError when the tiny model would miss one of the flagship's layer types.
    """
    cls = arch.config_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flagship = cls()
    n_layers = TINY["num_hidden_layers"]
    kw: dict[str, Any] = {k: v for k, v in TINY.items() if k in fields}
    for name, value in TINY_SIZES.items():
        current = getattr(flagship, name, None)
        if name in fields and isinstance(current, int) and current > 0:
            kw[name] = value
    # Keep multi-head attention multi-head, and grouped-query attention grouped.
    mha = flagship.num_key_value_heads in (None, flagship.num_attention_heads)
    kw["num_key_value_heads"] = kw["num_attention_heads"] if mha else 2
    for name in ("sliding_window", "attention_chunk_size"):
        if name in fields and getattr(flagship, name, None):
            kw[name] = TINY_WINDOW
    for name in EXPERT_COUNT_FIELDS:
        if name in fields and isinstance(getattr(flagship, name, None), int) and getattr(flagship, name) > 0:
            kw[name] = TINY_EXPERTS
    for name in TOP_K_FIELDS:
        if name in fields and isinstance(getattr(flagship, name, None), int):
            kw[name] = min(getattr(flagship, name), 2)
    if "n_group" in fields and (getattr(flagship, "n_group", None) or 1) > 1:
        kw["n_group"] = 4
        kw["topk_group"] = min(getattr(flagship, "topk_group", 1) or 1, 2)
    if "linear_num_key_heads" in fields and getattr(flagship, "linear_num_key_heads", None):
        ratio = flagship.linear_num_value_heads // flagship.linear_num_key_heads
        kw["linear_num_key_heads"], kw["linear_num_value_heads"] = 2, 2 * ratio
    if "linear_attn_config" in fields and isinstance(getattr(flagship, "linear_attn_config", None), dict):
        kw["linear_attn_config"] = _shrink_linear_attn_config(flagship.linear_attn_config, n_layers)
    if "rotary_dim" in fields and isinstance(getattr(flagship, "rotary_dim", None), int):
        kw["rotary_dim"] = max(2, flagship.rotary_dim * kw.get("head_dim", 16) // flagship.head_dim)
    if "mlp_only_layers" in fields and getattr(flagship, "mlp_only_layers", None):
        kw["mlp_only_layers"] = [i for i in flagship.mlp_only_layers if i < n_layers]
    if "activation_sparsity_pattern" in fields and isinstance(getattr(flagship, "activation_sparsity_pattern", None),
                                                              list):
        # Resample proportionally: the tiny model keeps the flagship's share of sparse layers, first.
        pattern = flagship.activation_sparsity_pattern
        kw["activation_sparsity_pattern"] = [pattern[i * len(pattern) // n_layers] for i in range(n_layers)]
    for name, f in fields.items():  # per-layer lists written as class defaults: the first layers
        default = _field_default(f)
        if name not in kw and isinstance(default, list) and len(default) == flagship.num_hidden_layers:
            kw[name] = default[:n_layers]
    kw.update(overrides)
    config = _with_kv_sharing(cls, kw, flagship, fields, overrides)
    missing = sorted(set(flagship.layer_types) - set(config.layer_types))
    if missing:
        raise ValueError(f"tiny {arch.name} config has no {missing} layers "
                         f"(flagship: {sorted(set(flagship.layer_types))})")
    return config


def _with_kv_sharing(cls, kw: dict[str, Any], flagship, fields, overrides):
    """Build the config; with KV-shared layers, the most the tiny layout allows (each shared layer needs an
    earlier layer of its type to read from), proportional to the flagship's."""
    from .errors import ConfigError

    if "num_kv_shared_layers" not in fields or "num_kv_shared_layers" in overrides \
            or not getattr(flagship, "num_kv_shared_layers", 0):
        return cls(**kw)
    n = kw.get("num_hidden_layers", flagship.num_hidden_layers)
    wanted = max(1, round(flagship.num_kv_shared_layers * n / flagship.num_hidden_layers))
    for shared in range(wanted, -1, -1):
        try:
            return cls(**kw, num_kv_shared_layers=shared)
        except ConfigError:
            if shared == 0:
                raise
    raise AssertionError("unreachable")


def describe_layers(config) -> str:
    """Compact attention layout, e.g. '5 sliding(8) + 1 full' or '4 full, 1 NoPE'."""
    counts: dict[str, int] = {}
    for t in config.layer_types:
        counts[t] = counts.get(t, 0) + 1
    window = {"sliding_attention": getattr(config, "sliding_window", None),
              "chunked_attention": getattr(config, "attention_chunk_size", None)}
    parts = [f"{n} {t.replace('_attention', '')}" + (f"({window[t]})" if window.get(t) else "")
             for t, n in counts.items()]
    uses_rope = getattr(config, "layer_uses_rope", lambda i: True)
    nope = sum(not uses_rope(i) for i in range(config.num_hidden_layers))
    return " + ".join(parts) + (f", {nope} NoPE" if nope else "")


# ------------------------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------------------------
def tour_text() -> str:
    """The plain text shipped with the package for the perplexity evaluation (original prose, no licence issue)."""
    return resources.files("hf_archs").joinpath("data/tour_text.txt").read_text(encoding="utf-8")


def encode(text: str, vocab_size: int) -> torch.Tensor:
    """Bytes as token ids: byte b -> 3 + b (wrapped into the vocabulary); ids 0-2 stay pad / bos / eos."""
    span = vocab_size - SPECIAL_IDS
    return torch.tensor([SPECIAL_IDS + b % span for b in text.encode("utf-8")], dtype=torch.long)


def split_text(ids: torch.Tensor, seq_len: int, eval_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) batches of `seq_len` tokens: eval is the last `eval_fraction` of the text."""
    n_eval = max(1, int(len(ids) * eval_fraction) // seq_len)
    n_train = len(ids) // seq_len - n_eval
    chunks = ids[: (n_train + n_eval) * seq_len].view(-1, seq_len)
    return chunks[:n_train], chunks[n_train:]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss
    return math.exp(loss.item())


def lora_steps(model: torch.nn.Module, batch: torch.Tensor, steps: int, lr: float = 1e-2,
               seed: int = 0) -> tuple[torch.nn.Module, list[float], int]:
    """A few LoRA steps (peft, every linear layer but the head) on `batch`.

    Returns (the peft model, the training loss before each step, trainable parameters).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return peft_model, losses, trainable


# ------------------------------------------------------------------------------------------------------------------
# One architecture
# ------------------------------------------------------------------------------------------------------------------
STAGES = ("build", "save / load", "generate", "perplexity", "LoRA")


def tour_one(arch: Architecture, workdir: Path, new_tokens: int = 16, seed: int = 0, steps: int = 4,
             seq_len: int = 64, batch: int = 8, stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .presets import all_presets

    hf_logging.disable_progress_bar()  # the tour has its own progress bar
    stage = stage or (lambda name: None)
    torch.manual_seed(seed)
    start = time.perf_counter()
    stage("build")
    model = arch.causal_lm_class(tiny_config(arch)).eval()
    prompt = torch.randint(SPECIAL_IDS, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    stage("save / load")
    path = workdir / arch.name
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    stage("generate")
    with torch.no_grad():
        same = torch.equal(model(prompt).logits, loaded(prompt).logits)
        out = loaded.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
    stage("perplexity")
    train, held_out = split_text(encode(tour_text(), loaded.config.vocab_size), seq_len)
    train, held_out = train[:batch], held_out[:batch]
    ppl_before = perplexity(loaded, held_out)
    stage("LoRA")
    adapted, losses, trainable = lora_steps(loaded, train, steps, seed=seed)
    ppl_after = perplexity(adapted, held_out)
    return {
        "architecture": arch.name,
        "model_type": arch.model_type,
        "official": ", ".join(arch.official_model_types),
        "flagships": ", ".join(n for n, p in all_presets().items() if p.architecture == arch.name),
        "class": type(loaded).__name__,
        "layers": describe_layers(loaded.config),
        "params": sum(p.numel() for p in model.parameters()),
        "reload_exact": same,
        "generated": out.shape[1] - prompt.shape[1],
        "lora_trainable": trainable,
        "lora_loss": [round(x, 4) for x in losses],
        "ppl_before": round(ppl_before, 2),
        "ppl_after_lora": round(ppl_after, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }


# ------------------------------------------------------------------------------------------------------------------
# The whole tour
# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TourResult:
    rows: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    skipped: dict[str, str]  # preset -> why it was not compared
    unavailable: dict[str, str]  # registered architecture -> why it was not toured (its classes do not import)
    report_dir: Path | None
    files: list[Path]


def run_tour(names: Iterable[str] | None = None, report_dir: str | Path | None = None, new_tokens: int = 16,
             progress: bool = True, steps: int = 4, models_dir: str | Path | None = None,
             compare_presets: bool = True) -> TourResult:
    """Tour the architectures `names` (default: every registered one) and compare their flagship presets.

    `report_dir`: write report.md, the PNG plots and summary.json there (None: no report). `models_dir`: keep the
    saved tiny models there (default: a temporary folder).
    """
    from tqdm.auto import tqdm

    from .compare import compare as compare_presets_fn
    from .presets import all_presets

    from .presets import unavailable_reason

    requested = list(names or ARCHITECTURES)
    broken = {n: unavailable_reason(n) for n in requested if unavailable_reason(n) is not None}
    if names and broken:
        raise ValueError("; ".join(broken.values()))
    archs = [ARCHITECTURES[n] for n in requested if n not in broken]
    toured = {a.name for a in archs}
    presets = [n for n, p in all_presets().items() if p.architecture in toured or names is None] \
        if compare_presets else []
    bar = tqdm(total=len(archs) * len(STAGES) + len(presets) + (1 if report_dir else 0), desc="tour",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    rows = []
    threads = torch.get_num_threads()
    # Tiny models run single-threaded: at these sizes thread start-up and spinning cost more than they save
    # (on a loaded 2-core machine, 20x more).
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(models_dir) if models_dir else Path(tmp)
            for arch in archs:
                rows.append(tour_one(arch, workdir, new_tokens, steps=steps, stage=_StageBar(bar, arch.name)))
                bar.update(1)  # the last stage
    finally:
        torch.set_num_threads(threads)

    def compared(name: str) -> None:
        bar.set_description(f"compare {name}")
        bar.update(1)

    comparison, skipped = ([], {})
    if presets:
        comparison, skipped = compare_presets_fn(presets, progress=compared, strict=False)

    files: list[Path] = []
    if report_dir is not None:
        bar.set_description("report")
        files = write_report(Path(report_dir), rows, comparison, skipped, broken)
        bar.update(1)
    bar.close()
    return TourResult(rows, comparison, skipped, broken, Path(report_dir) if report_dir else None, files)


class _StageBar:
    """Advances the progress bar as `tour_one` enters each stage."""

    def __init__(self, bar, arch: str) -> None:
        self.bar, self.arch, self.started = bar, arch, False

    def __call__(self, stage: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(f"tour {self.arch}: {stage}")


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["architecture", "official", "class", "layers", "params", "reload_exact", "generated", "ppl_before",
                 "ppl_after_lora", "seconds"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The tour rows as a Markdown table (also readable on a terminal)."""
    cols = TABLE_COLUMNS
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), rule, *map(line, cells)])


def _versions() -> str:
    import transformers

    from . import __version__

    return (f"hf_archs {__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_report(out: Path, rows: list[dict[str, Any]], comparison: list[dict[str, Any]],
                 skipped: dict[str, str], unavailable: dict[str, str] | None = None) -> list[Path]:
    """report.md, cache_vs_context.png, params_total_vs_active.png, summary.json in `out`; returns the paths."""
    from .compare import CONVENTIONS, format_rows, plot
    from .presets import all_presets

    out.mkdir(parents=True, exist_ok=True)
    files = plot(comparison, out) if comparison else []
    unavailable = unavailable or {}
    summary = {"versions": _versions(), "tour": rows, "comparison": comparison, "skipped_presets": skipped,
               "unavailable_architectures": unavailable, "conventions": CONVENTIONS}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files.append(out / "summary.json")

    lines = ["# hf_archs tour", "", f"Produced by `hf-archs tour` ({_versions()}).", "",
             "## Every architecture, tiny", "",
             "Each architecture was built tiny with its flagship's layout (every layer type present), saved, loaded "
             "back through `AutoModelForCausalLM` (`reload_exact`: identical logits), made to generate, evaluated "
             "on the text shipped with the package (bytes as tokens; random weights, so the perplexity is only a "
             "smoke test), given a few LoRA steps and evaluated again.", "",
             format_table(rows), ""]
    if comparison:
        lines += ["## The official flagships compared", "",
                  "Counts from each preset's model built on the meta device; cache sizes in bf16, batch 1.", "",
                  format_rows(comparison, "markdown"), ""]
        lines += [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in files if p.suffix == ".png"] + [""]
    if unavailable:
        lines += ["## Architectures not toured", "", *(f"- `{n}`: {r}" for n, r in unavailable.items()), ""]
    if skipped:
        lines += ["## Skipped presets", "", *(f"- `{n}`: {r}" for n, r in skipped.items()), ""]
    lines += ["## Counting conventions", "", "```", CONVENTIONS.rstrip(), "```", "", "## Sources", ""]
    for name in [r["name"] for r in comparison] + list(skipped):
        p = all_presets()[name]
        note = f" (not verified against the file: {', '.join(p.unverified)})" if p.unverified else ""
        lines.append(f"- `{name}`: {p.source}{note}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    files.append(out / "report.md")
    return files


def short_table(rows: list[dict[str, Any]]) -> str:
    cols = ["architecture", "layers", "params", "reload_exact", "generated", "ppl_before", "ppl_after_lora", "seconds"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *map(line, cells)])


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
DEFAULT_REPORT_DIR = "hf-archs-tour"


def add_parser(sub) -> None:
    tour = sub.add_parser("tour", help="build every architecture tiny from its flagship's layout, save, reload "
                                       "through AutoModelForCausalLM, generate, LoRA, perplexity; then compare "
                                       "the official flagships and write a report (the default command)")
    tour.add_argument("--arch", action="append", choices=sorted(ARCHITECTURES),
                      help="only this architecture (repeatable; default: all)")
    tour.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per model (default: 16)")
    tour.add_argument("--lora-steps", type=int, default=4, help="LoRA steps per model (default: 4)")
    tour.add_argument("--out", default=DEFAULT_REPORT_DIR,
                      help=f"report folder: report.md, PNG plots, summary.json (default: ./{DEFAULT_REPORT_DIR})")
    tour.add_argument("--keep-models", metavar="DIR", help="keep the saved tiny models in DIR")
    tour.add_argument("--no-compare", action="store_true", help="skip the comparison of the official flagships")
    tour.add_argument("--format", choices=["table", "json"], default="table",
                      help="terminal output: a short table, or the tour rows as JSON (only JSON on stdout)")
    tour.add_argument("--quiet", action="store_true", help="no progress bar")
    tour.set_defaults(func=_cmd_tour)


def _cmd_tour(args) -> int:
    from transformers.utils import logging as hf_logging

    # Flagship configs' own warnings (Llama 4 Scout's llama3 RoPE with equal low / high factors) are not news here.
    hf_logging.set_verbosity_error()
    result = run_tour(args.arch or None, report_dir=args.out, new_tokens=args.new_tokens, progress=not args.quiet,
                      steps=args.lora_steps, models_dir=args.keep_models, compare_presets=not args.no_compare)
    rows = result.rows
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(short_table(rows))
    print(f"Report: {(result.report_dir / 'report.md').resolve()}", file=sys.stderr if args.format == "json"
          else sys.stdout)
    failed = [r["architecture"] for r in rows if not r["reload_exact"] or r["generated"] != args.new_tokens
              or not math.isfinite(r["ppl_after_lora"])]
    failed += [name for name, reason in result.skipped.items() if reason.startswith("failed:")]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0

"""Supervised fine-tuning recipe (LoRA or full) and the `hf-archs finetune` command.

One script for one process, `torchrun` or `accelerate launch` (DDP, FSDP2, DeepSpeed configs in
`examples/accelerate/`). What a step does:

    records (json / jsonl / csv / parquet / txt, read with `datasets`)
      -> token ids + labels (chat template or plain text; prompt tokens labelled -100 when masked)
      -> rows: padded per micro-batch, or packed to `max_length` (position ids restart per example, and
         transformers' masks keep the examples apart)
    global batch of step s = a fixed slice of a seeded per-epoch permutation; rank r takes its share, so any
    number of processes sees the same global batch (and resuming at step s needs no data state)
    loss = sum of token cross-entropies / tokens in the global batch, computed from the final hidden states in
         chunks of `loss_chunk_size` tokens, only at labelled positions, head and cross-entropy fused: each
         chunk's gradient is computed with its logits in the forward and the logits freed (never [tokens, vocab]
         for the whole batch, no recomputation in backward)

Optimizers: AdamW, or Muon (`torch.optim.Muon`, Moonshot's RMS-matched learning rate) for the 2-D hidden weights
and AdamW for embeddings, norms, biases, the head and 3-D expert factors; optional QK-clip (Kimi K2) for full
fine-tuning of attention. Outputs in `output_dir`: `log.json`, `loss.png`, `checkpoint-<step>/` (resumable);
`--save DIR` writes what `--push-to-hub` uploads: the adapter (or merged model), the tokenizer, a model card.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE = -100
SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>"]  # ids 0..4: pad, bos, eos, unk
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
# The text the built-in tokenizer's vocabulary comes from: printable ASCII, one token per character.
TOKENIZER_TEXT = "".join(chr(c) for c in range(32, 127)) + "\n\t"


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and synthetic tasks (no download anywhere)
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer(save_dir: str | os.PathLike | None = None):
    """A character-level tokenizer built with `tokenizers` from the text this module ships (printable ASCII),
    with ChatML-style special tokens and chat template. ids: 0 pad, 1 bos, 2 eos (`<|im_end|>`), 3 unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in TOKENIZER_TEXT:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


def synthetic_task(name: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Small tasks with a checkable answer, for tests and examples (prompt / completion records).

    - "shift": a 3-letter word -> each letter moved one along the alphabet ("abz=" -> "bca").
    - "add": two 2-digit numbers -> their sum ("12+34=" -> "46").
    - "recall": key -> value over a fixed table of 16 pairs seeded by `seed` ("key k3:" -> "q7x").
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    table_rng = random.Random(1234)
    table = {f"k{i}": "".join(table_rng.choice(letters) for _ in range(3)) for i in range(16)}
    for _ in range(n):
        if name == "shift":
            w = "".join(rng.choice(letters) for _ in range(3))
            out.append({"prompt": f"{w}=", "completion": "".join(letters[(letters.index(c) + 1) % 26] for c in w)})
        elif name == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        elif name == "recall":
            k = rng.choice(sorted(table))
            out.append({"prompt": f"key {k}:", "completion": table[k]})
        else:
            raise ValueError(f"unknown synthetic task {name!r}: shift, add or recall")
    return out


def write_records(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as .jsonl / .json / .csv / .parquet / .txt (the `text` field), by the file's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(list(records)))
    elif suffix in (".csv", ".parquet"):
        import datasets

        ds = datasets.Dataset.from_list(list(records))
        ds.to_csv(str(path), index=False) if suffix == ".csv" else ds.to_parquet(str(path))
    elif suffix == ".txt":
        path.write_text("".join(r["text"].replace("\n", " ") + "\n" for r in records))
    else:
        raise ValueError(f"unsupported data file extension {suffix!r}")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_records(path: str | os.PathLike):
    """A local data file as a `datasets.Dataset` (json, jsonl, csv, parquet; .txt: one `text` record a line)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; use one of {sorted(FORMATS)}")
    ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    if fmt == "text":
        ds = ds.filter(lambda r: bool(r["text"].strip()))
    return ds


@dataclass
class DataFields:
    """Which fields of a record hold what. A record is chat `messages`, or a `prompt` / `completion` pair, or
    plain `text` (every token trained on)."""

    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


def prompt_and_completion(record: dict[str, Any], tokenizer, fields: DataFields, chat_template: bool
                          ) -> tuple[str, str]:
    """The record as (prompt text, completion text): the loss covers the completion (and the prompt too unless
    it is masked). With a chat template the prompt ends with the assistant header (generation prompt)."""
    if record.get(fields.messages):
        if not chat_template:
            raise ValueError("a chat `messages` record needs the chat template (drop --no-chat-template)")
        messages = list(record[fields.messages])
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message of a chat record must be the assistant's")
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    elif record.get(fields.prompt) is not None and record.get(fields.completion) is not None:
        p, c = str(record[fields.prompt]), str(record[fields.completion])
        if not chat_template:
            return p, c + (tokenizer.eos_token or "")
        messages = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    elif record.get(fields.text) is not None:
        return "", str(record[fields.text]) + (tokenizer.eos_token or "")
    else:
        raise ValueError(f"record has none of the fields {fields.messages!r}, {fields.prompt!r} + "
                         f"{fields.completion!r}, {fields.text!r}: {sorted(record)}")
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the conversation as prompt + completion")
    return prompt, full[len(prompt):]


def tokenize_record(record: dict[str, Any], tokenizer, fields: DataFields, chat_template: bool, mask_prompt: bool,
                    max_length: int) -> dict[str, list[int]]:
    prompt, completion = prompt_and_completion(record, tokenizer, fields, chat_template)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not chat_template else []
    p_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) if mask_prompt else list(p_ids)) + c_ids
    return {"input_ids": ids, "labels": labels[:max_length]}


def tokenize_dataset(ds, tokenizer, fields: DataFields, chat_template: bool, mask_prompt: bool, max_length: int
                     ) -> list[dict[str, list[int]]]:
    rows = [tokenize_record(r, tokenizer, fields, chat_template, mask_prompt, max_length) for r in ds]
    return [r for r in rows if any(t != IGNORE for t in r["labels"][1:])]


def pack(rows: Sequence[dict[str, list[int]]], max_length: int, pad_id: int) -> list[dict[str, list[int]]]:
    """First-fit-decreasing packing of whole examples into rows of `max_length`; `position_ids` restart at each
    example, which is what keeps examples apart in attention (transformers detects packed rows from them)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(space):
            if free >= n:
                bins[b].append(i)
                space[b] -= n
                break
        else:
            bins.append([i])
            space.append(max_length - n)
    packed = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in sorted(b):
            ids += rows[i]["input_ids"]
            # The first token of each example is never a target of the previous one.
            labels += [IGNORE] + rows[i]["labels"][1:]
            pos += list(range(len(rows[i]["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def collate(rows: Sequence[dict[str, list[int]]], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors. Packed rows carry `position_ids` and no attention mask (the padding forms its own
    'example' and has no labels); padded rows carry an attention mask."""
    length = pad_to or max(len(r["input_ids"]) for r in rows)
    packed = "position_ids" in rows[0]
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    pos = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(r["position_ids"])
            pos[i, n:] = torch.arange(length - n)
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GlobalBatches:
    """Micro-batch `j` of every process, for global step `s`: a seeded permutation per epoch, cut into global
    micro-batches of `per_device * world` rows; rank `r` takes rows [r * per_device, (r + 1) * per_device).
    The same global batches for any number of processes, and a resumed run needs only the step number."""

    def __init__(self, n_rows: int, per_device: int, world: int, accum: int, seed: int) -> None:
        self.n, self.per_device, self.world, self.accum, self.seed = n_rows, per_device, world, accum, seed
        self.global_micro = per_device * world
        self.micro_per_epoch = n_rows // self.global_micro
        if self.micro_per_epoch < accum:
            raise ValueError(f"{n_rows} training rows cannot fill one step of {accum} x {per_device} x {world} "
                             f"(gradient accumulation x batch size x processes)")
        self.steps_per_epoch = self.micro_per_epoch // accum

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        start = (step_in_epoch * self.accum + micro) * self.global_micro + rank * self.per_device
        return perm[start:start + self.per_device]


# ----------------------------------------------------------------------------------------------------------------
# Memory-lean loss
# ----------------------------------------------------------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of `cross_entropy(hidden @ weight.T, targets)` with the gradients computed in the forward,
    `chunk` rows at a time: the gradient of a summed cross-entropy with respect to its logits is known as soon as
    the logits are (softmax - one-hot), so each chunk's [chunk, vocab] logits are used once and freed, and
    backward only scales the stored `grad_hidden` [rows, hidden] (and `grad_weight`, when the head is trained) by
    the incoming gradient. Compared with checkpointing each chunk, the head's matmul is not recomputed in
    backward; compared with autograd over whole logits, no [rows, vocab] tensor (nor its fp32 copy, softmax and
    gradient) ever exists. Softmax and the loss are computed in fp32 whatever the matmul's dtype (autocast
    applies to the matmuls as it would to the head module). The same chunked idea as Liger's fused linear
    cross-entropy, written with torch ops."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:  # hidden [N, H], weight [V, H], targets [N]
        device = hidden.device.type
        # The matmuls' dtype: autocast's when it is on (as the head module would run), else the weight's.
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_max = min(chunk, hidden.shape[0])
        # One buffer of each kind for every chunk: a fresh [chunk, V] tensor per chunk would cost its page faults
        # (or allocator traffic) again each time.
        logits_buf = torch.empty(n_max, weight.shape[0], dtype=mm_dtype, device=weight.device)
        probs_buf = torch.empty(n_max, weight.shape[0], dtype=torch.float32, device=weight.device)
        with torch.autocast(device, enabled=False):
            w = weight.to(mm_dtype)
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk].to(mm_dtype), targets[start:start + chunk]
                n = t.shape[0]
                rows = torch.arange(n, device=t.device)
                logits = torch.mm(h, w.t(), out=logits_buf[:n])  # [n, V]
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32, out=probs_buf[:n])  # fp32 always
                p_target = probs[rows, t]
                loss = -p_target.log()  # exact while the target's probability is a normal fp32 number
                tiny = p_target < 1e-30  # loss > 69: from the logits instead (rare; never an underflow to inf)
                if bool(tiny.any()):
                    x = logits[tiny].float()
                    loss[tiny] = torch.logsumexp(x, dim=-1) - x.gather(1, t[tiny, None]).squeeze(1)
                total += loss.sum()
                if not (want_h or want_w):
                    continue
                probs[rows, t] -= 1.0  # d loss / d logits = softmax - one-hot
                g = probs  # softmax - one-hot, in the matmul's dtype: into the logits' buffer (no longer needed)
                if mm_dtype != torch.float32:
                    g = logits.copy_(probs)
                if want_h:
                    grad_hidden[start:start + n] = g @ w  # [n, H]
                if want_w:
                    grad_weight += (g.t() @ h).float()  # [V, H]
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


class LossModel(nn.Module):
    """Wraps a CausalLM (possibly LoRA-injected) so that one `forward` returns the *sum* of token cross-entropies
    and the number of target tokens, without materialising [tokens, vocab] logits: only the final hidden states
    at labelled positions go through the head, `chunk_size` rows at a time. With a plain linear head (no logit
    post-processing such as soft-capping, no bias, weights not sharded) the head and the cross-entropy are fused
    (`LinearCrossEntropy`: gradients computed chunk by chunk in the forward, no recomputation); otherwise each
    chunk runs under non-reentrant activation checkpointing (its logits freed after the forward and recomputed
    in backward). Distributed wrappers wrap this module, so their hooks see the whole computation."""

    def __init__(self, causal_lm: nn.Module, chunk_size: int = 256, router_aux_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.lm = causal_lm
        self.chunk_size = chunk_size
        self.router_aux_loss_coef = router_aux_loss_coef
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm.lm_head(hidden)
        if hasattr(self.lm, "process_logits"):
            logits = self.lm.process_logits(logits)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def fused_head(self) -> bool:
        """Whether the head can run fused with the loss: a plain linear layer (`nn.Linear` or the package's own
        `Linear`, not a quantized or adapted subclass) without bias or hooks, no logit
        post-processing, and a weight that is an ordinary tensor right now (not a DTensor shard of FSDP, not a
        DeepSpeed ZeRO-3 partition); anything else goes through the module (checkpointed chunks)."""
        from .layers.linear import Linear
        from .modeling_base import CausalLM

        head = self.lm.lm_head
        processed = hasattr(self.lm, "process_logits") and (
            not isinstance(self.lm, CausalLM) or type(self.lm).process_logits is not CausalLM.process_logits)
        w = getattr(head, "weight", None)
        return (type(head) in (nn.Linear, Linear) and head.bias is None and not processed and w is not None
                and not head._forward_hooks and not head._forward_pre_hooks
                and type(w.data) is torch.Tensor and not hasattr(w, "ds_id") and w.numel() > 0)

    @contextlib.contextmanager
    def _adapter_input_casts_off(self, device_type: str):
        """Under autocast, PEFT's cast of each LoRA linear's input to the adapter's dtype (fp32 over a bf16 base)
        makes a copy that autocast casts straight back to bf16 for the matmul, and that copy is what the adapter
        keeps for backward: one extra [tokens, in] tensor per adapted projection (q, k and v each make their
        own). Same numbers without it (the bf16 input is exact in fp32), so it is switched off while autocast runs.
        Only PEFT's plain `Linear` LoRA layers: other layers keep their own casting."""
        if not torch.is_autocast_enabled(device_type):
            yield
            return
        try:
            from peft.tuners.lora.layer import Linear as LoraLinear
        except ImportError:
            yield
            return
        layers = [m for m in self.lm.modules() if type(m) is LoraLinear]
        before = [m.__dict__.get("cast_input_dtype_enabled") for m in layers]
        for m in layers:
            m.cast_input_dtype_enabled = False
        try:
            yield
        finally:
            for m, b in zip(layers, before):
                if b is None:
                    del m.cast_input_dtype_enabled
                else:
                    m.cast_input_dtype_enabled = b

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        kwargs = {"output_router_logits": True} if self.router_aux_loss_coef else {}
        with self._adapter_input_casts_off(input_ids.device.type):
            out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False, **kwargs)
        hidden = out.last_hidden_state[:, :-1]  # position i predicts token i + 1
        targets = labels[:, 1:]
        keep = targets != IGNORE
        selected, targets = hidden[keep], targets[keep]  # [N, H], [N]
        total = hidden.sum() * 0.0  # keeps the graph connected when this micro-batch has no target
        total = total.float()
        chunk = self.chunk_size if self.chunk_size > 0 else max(1, selected.shape[0])
        grad = self.training and torch.is_grad_enabled()
        if grad and selected.shape[0] and self.fused_head():
            total = total + LinearCrossEntropy.apply(selected, self.lm.lm_head.weight, targets, chunk)
        else:
            for start in range(0, selected.shape[0], chunk):
                h, t = selected[start:start + chunk], targets[start:start + chunk]
                if grad:
                    total = total + torch.utils.checkpoint.checkpoint(self._chunk_loss, h, t, use_reentrant=False)
                else:
                    total = total + self._chunk_loss(h, t)
        aux = None
        if self.router_aux_loss_coef and getattr(out, "router_logits", None):
            # The release's recipe: the Switch loss, or DeepSeek's sequence-wise loss where the config says seq_aux.
            aux = self.lm.router_balance_loss(out.router_logits, attention_mask, input_ids.shape[0])
        return total, keep.sum(), aux


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The CausalLM (with `.model` and `.lm_head`) inside a PEFT / DDP wrapper."""
    m = model
    while isinstance(getattr(m, "module", None), nn.Module):  # DDP / accelerate wrappers
        m = m.module
    if hasattr(m, "get_base_model") and hasattr(m, "peft_config"):
        m = m.get_base_model()
    if isinstance(m, LossModel):
        m = m.lm
    if "lm_head" not in m._modules or "model" not in m._modules:
        raise TypeError(f"{type(model).__name__} holds no CausalLM (a module with .model and .lm_head)")
    return m


# ----------------------------------------------------------------------------------------------------------------
# Optimizers and QK-clip
# ----------------------------------------------------------------------------------------------------------------
def split_for_muon(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D hidden weights for Muon, everything else for AdamW): embeddings, the output heads, norms, biases and
    3-D tensors (fused experts and their per-expert factors) go to AdamW."""
    head_ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.rpartition(".")[2] in ("lm_head", "head", "embed_tokens"):
            head_ids.update(id(p) for p in module.parameters())
    muon, adamw = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (muon if p.dim() == 2 and id(p) not in head_ids else adamw).append(p)
    return muon, adamw


def build_optimizers(model: nn.Module, name: str, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.999)) -> list[torch.optim.Optimizer]:
    if name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return [torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)]
    if name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"--optimizer muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
        muon, adamw = split_for_muon(model)
        out = []
        if muon:
            # Moonshot's RMS matching lets Muon reuse AdamW's learning rate and weight decay.
            out.append(torch.optim.Muon(muon, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
        if adamw:
            out.append(torch.optim.AdamW(adamw, lr=lr, weight_decay=weight_decay, betas=betas))
        return out
    raise ValueError(f"--optimizer must be adamw or muon, got {name!r}")


class QKClip:
    """Kimi K2's QK-clip (MuonClip) for softmax attention trained in full: after each optimizer step, every head
    whose largest attention logit in the step exceeded `threshold` has its query / key projections rescaled so
    that logit would have been `threshold`: per query head h, gamma_h = threshold / max_logit_h; the shared key
    head g of a group is scaled by sqrt(min_h gamma_h) and each query head by gamma_h / sqrt(that), so every
    head's logits scale by exactly gamma_h. (Kimi K2 report, section 2.1.)

    Needs attention without QK-norm (a norm after the projections undoes any rescale): refused otherwise.
    """

    def __init__(self, model: nn.Module, threshold: float) -> None:
        from .layers.attention import Attention

        self.threshold = threshold
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        if not self.layers:
            raise ValueError("QK-clip: the model has no softmax attention layer")
        normed = [m for m in self.layers if m.q_norm is not None or m.k_norm is not None]
        if normed:
            raise ValueError("QK-clip needs attention without QK-norm (the norm undoes the rescale of q / k "
                             f"projections); this model normalises q and k in {len(normed)} layers")
        self.max_logits: dict[nn.Module, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._record, with_kwargs=True) for m in self.layers]
        self.clipped_heads = 0

    @torch.no_grad()
    def _record(self, module, args, kwargs, output) -> None:
        from .layers.rope import apply_rope

        if not module.training:
            return
        names = ("hidden_states", "position_embeddings", "attention_mask")
        vals = dict(zip(names, args))
        vals.update({k: kwargs[k] for k in names if k in kwargs})
        x, rope, mask = vals["hidden_states"], vals.get("position_embeddings"), vals.get("attention_mask")
        b, t, _ = x.shape
        q = module.q_proj(x).view(b, t, -1, module.head_dim).transpose(1, 2).float()
        k = module.k_proj(x).view(b, t, -1, module.head_dim).transpose(1, 2).float()
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos.float(), sin.float(), module.interleaved_rope)
            k = apply_rope(k, cos.float(), sin.float(), module.interleaved_rope)
        k = k.repeat_interleave(module.num_key_value_groups, dim=1)
        logits = torch.matmul(q, k.transpose(2, 3)) * module.scaling  # [b, heads, t, t]
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if isinstance(mask, torch.Tensor):
            m = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            allowed = allowed & m[..., -t:, -t:]
        logits = logits.masked_fill(~allowed, float("-inf"))
        head_max = logits.amax(dim=(0, 2, 3))  # [heads]
        prev = self.max_logits.get(module)
        self.max_logits[module] = head_max if prev is None else torch.maximum(prev, head_max)

    @torch.no_grad()
    def apply(self) -> int:
        """Rescale the projections of the heads over the threshold; returns how many heads were clipped."""
        clipped = 0
        for module, head_max in self.max_logits.items():
            gamma = (self.threshold / head_max.clamp_min(1e-6)).clamp(max=1.0)  # [heads]
            if bool((gamma >= 1.0).all()):
                continue
            clipped += int((gamma < 1.0).sum())
            group_gamma = gamma.view(module.num_kv_heads, -1).amin(dim=1)  # [kv_heads]
            q_scale = gamma / group_gamma.sqrt().repeat_interleave(module.num_key_value_groups)
            k_scale = group_gamma.sqrt()
            for proj, scale in ((module.q_proj, q_scale), (module.k_proj, k_scale)):
                rows = scale.repeat_interleave(module.head_dim).to(proj.weight.dtype)
                proj.weight.mul_(rows[:, None])
                if proj.bias is not None:
                    proj.bias.mul_(rows)
        self.max_logits.clear()
        self.clipped_heads += clipped
        return clipped

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
GROUP_CHOICES = {"on": True, "auto": None, "off": False}


@dataclass
class FinetuneArgs:
    """Every setting of the recipe (the CLI flags have the same names with dashes)."""

    # model and data
    model: str | None = None
    tiny: str | None = None
    tiny_init_std: float | None = None
    tiny_config: str | dict | None = None
    tokenizer: str | None = None
    train_file: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.0
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    chat_template: bool = True
    mask_prompt: bool = True
    max_length: int = 1024
    packing: bool = False
    # what is trained
    full: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    attention: str = "auto"
    mlp: str = "auto"
    shared_experts: str = "auto"
    experts: str = "off"
    router: str = "off"
    experts_method: str = "grouped"
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    qk_clip: float | None = None
    router_aux_loss_coef: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    epochs: float | None = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    # 256: measured fastest on a CPU with a 152k vocabulary (bench/bench_lora.py), and [256, vocab] is small
    loss_chunk_size: int = 256
    attn_implementation: str | None = None
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_steps: int = 0
    eval_generate: int = 0
    max_new_tokens: int = 32
    log_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = None
    output_dir: str = "finetune-out"
    resume_from: str | None = None
    progress: bool = True
    plot: bool = True
    # what is kept
    save: str | None = None
    merge: bool = False
    push_to_hub: str | None = None
    hub_private: bool = True

    def check(self) -> None:
        if (self.model is None) == (self.tiny is None):
            raise ValueError("pass exactly one of --model DIR or --tiny ARCH")
        if not self.train_file:
            raise ValueError("--train-file is required")
        for g in ("attention", "mlp", "shared_experts", "experts", "router"):
            if getattr(self, g) not in GROUP_CHOICES:
                raise ValueError(f"--{g.replace('_', '-')} must be one of {sorted(GROUP_CHOICES)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.qk_clip is not None and not self.full:
            raise ValueError("--qk-clip rescales the base q / k projections: it needs --full fine-tuning")
        if self.merge and self.full:
            raise ValueError("--merge applies to LoRA adapters; a full fine-tune is saved as a model")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("--eval-fraction must be in [0, 1)")


# ----------------------------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------------------------
def tiny_model(arch_name: str, vocab_size: int, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random model of a registered architecture (tour sizes), its vocabulary matched to a tokenizer."""
    from .registry import ARCHITECTURES
    from .tour import tiny_config

    if arch_name not in ARCHITECTURES:
        raise ValueError(f"--tiny {arch_name!r}: not a registered architecture ({sorted(ARCHITECTURES)})")
    arch = ARCHITECTURES[arch_name]
    config = tiny_config(arch, **overrides)
    if getattr(config, "vocab_size", vocab_size) < vocab_size:
        config = tiny_config(arch, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    return arch.causal_lm_class(config)


def load_model(path: str, dtype: torch.dtype, attn_implementation: str | None = None) -> nn.Module:
    """A model directory in this package's layout (`hfa_*` config) or an official release directory."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if str(cfg.get("model_type", "")).startswith("hfa_"):
        import hf_archs  # noqa: F401 - registers the model types
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    from .official import from_official

    return from_official(path, dtype=dtype, **kwargs)


def load_tokenizer(args: FinetuneArgs):
    if args.tokenizer == "builtin" or (args.tokenizer is None and args.tiny):
        return build_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def lora_groups(args: FinetuneArgs) -> dict[str, bool | None]:
    return {g: GROUP_CHOICES[getattr(args, g)] for g in ("attention", "mlp", "shared_experts", "experts", "router")}


# ----------------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------------
def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        if kind == "constant":
            return 1.0
        raise ValueError(f"--lr-scheduler must be cosine, linear or constant, got {kind!r}")
    return f


def _rng_state() -> dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def recipe_accelerator(precision: str = "fp32", cpu: bool | None = None):
    """The recipe's `Accelerator`: the machine's accelerator if there is one (else the CPU, or always with
    `cpu=True`; a torchrun-style launch of CPU processes then runs DDP on gloo), bf16 autocast when
    `precision == "bf16"`. Resets accelerate's process-wide state first, so that several runs in one process (the
    API, tests, benchmarks) may differ in precision (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state()
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return Accelerator(cpu=not has_accelerator if cpu is None else cpu, mixed_precision="bf16" if precision == "bf16" else "no",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def prepare_model(base: nn.Module, args: FinetuneArgs) -> tuple[nn.Module, dict[str, Any]]:
    """The model the recipe trains, from a loaded base model: under LoRA with `precision="bf16"` the frozen base
    in bf16 (PEFT keeps the adapters in fp32), no KV cache, optional gradient checkpointing, and the LoRA adapters
    on `lora_targets` (or every weight trainable with `full`). Returns (model, the `LoraConfig` target arguments)."""
    if args.precision == "bf16" and not args.full:
        base = base.to(torch.bfloat16)  # frozen base in bf16; PEFT keeps the adapters in fp32
    base.config.use_cache = False
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.full:
        base.requires_grad_(True)
        return base, {}
    from peft import LoraConfig, get_peft_model

    from .lora import lora_targets

    targets = lora_targets(base, **lora_groups(args), experts_method=args.experts_method)
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                     **targets)
    return get_peft_model(base, cfg), targets


def optimizer_step(ddp_model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                   micro_batches: Sequence[dict[str, torch.Tensor]], accelerator, max_grad_norm: float = 1.0,
                   router_aux_loss_coef: float = 0.0, schedulers: Sequence[Any] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One optimizer step of the recipe over this process's micro-batches (gradient accumulation): forward of
    the `LossModel` (`ddp_model`, as `accelerator.prepare` returned it) under the accelerator's autocast, loss =
    token cross-entropy sum / target tokens of the *global* batch, backward per micro-batch (gradient sync on the
    last only), gradient clipping at `max_grad_norm` (0 = none), the optimizers' and schedulers' steps, zero_grad.
    Returns (mean loss over the global batch, global target tokens, gradient norm before clipping or None)."""
    acc = accelerator
    world = acc.num_processes
    local_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    n_global = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), "sum")
    loss_sum = torch.zeros((), device=acc.device)
    for j, batch in enumerate(micro_batches):
        sync = j == len(micro_batches) - 1
        ctx = contextlib.nullcontext() if sync or world == 1 else acc.no_sync(ddp_model)
        with ctx:
            with acc.autocast():
                total, _, aux = ddp_model(**batch)
            # DDP averages gradients over processes: times world size makes it the global token mean.
            loss = total * world / n_global.clamp_min(1)
            if aux is not None:
                loss = loss + router_aux_loss_coef * aux / len(micro_batches)
            acc.backward(loss)
        loss_sum += total.detach()
    grad_norm = None
    if max_grad_norm:
        grad_norm = acc.clip_grad_norm_([p for p in ddp_model.parameters() if p.requires_grad], max_grad_norm)
    for o in optimizers:
        o.step()
    for s in schedulers:
        s.step()
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    return acc.reduce(loss_sum, "sum") / n_global.clamp_min(1), n_global, grad_norm


class Finetune:
    """The recipe as an object: `Finetune(args).run()` returns the summary written to `log.json`."""

    def __init__(self, args: FinetuneArgs, accelerator=None) -> None:
        args.check()
        self.args = args
        self.accelerator = accelerator or recipe_accelerator(args.precision)
        if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
                and "FSDP" not in str(self.accelerator.distributed_type)):
            logger.warning("an FSDP config was given but Accelerate runs %s: Accelerate sets FSDP up only on GPU-like "
                           "devices (on a CPU it falls back to data parallel)", self.accelerator.distributed_type)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.output_dir = Path(args.output_dir)
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    # --- setup --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.args
        random.seed(a.seed)
        torch.manual_seed(a.seed)
        self.tokenizer = load_tokenizer(a)
        if a.tiny:
            extra = dict(json.loads(a.tiny_config) if isinstance(a.tiny_config, str) else (a.tiny_config or {}))
            if a.tiny_init_std:
                extra["initializer_range"] = a.tiny_init_std
            base = tiny_model(a.tiny, len(self.tokenizer), seed=a.seed, **extra)
            base.config.pad_token_id = self.tokenizer.pad_token_id
        else:
            base = load_model(a.model, torch.float32, a.attn_implementation)
        if a.attn_implementation and a.tiny:
            base.set_attn_implementation(a.attn_implementation)
        from accelerate.utils import DistributedDataParallelKwargs

        from .layers.moe import Experts

        self.model, self.targets = prepare_model(base, a)
        self.qk_clip = QKClip(self.model, a.qk_clip) if a.qk_clip is not None else None
        self.loss_model = LossModel(causal_lm_of(self.model), a.loss_chunk_size, a.router_aux_loss_coef)
        self.trainable = [n for n, p in self.loss_model.named_parameters() if p.requires_grad]
        self._load_data()
        self.total_steps = a.max_steps
        if a.epochs is not None:
            self.total_steps = max(1, int(a.epochs * self.batches.steps_per_epoch))
        self.optimizers = build_optimizers(self.loss_model, a.optimizer, a.lr, a.weight_decay, (a.beta1, a.beta2))
        warmup = a.warmup_steps or int(a.warmup_ratio * self.total_steps)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _lr_lambda(a.lr_scheduler, warmup, self.total_steps))
                           for o in self.optimizers]
        if a.full and any(isinstance(m, Experts) for m in self.loss_model.modules()):
            # Full fine-tuning of routed experts: an expert may get no token on a process in a step.
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        # Schedulers stay outside `prepare`: Accelerate would step them once per process.
        prepared = self.accelerator.prepare(self.loss_model, *self.optimizers)
        self.ddp_model, self.optimizers = prepared[0], list(prepared[1:])
        self.start_step = 0
        if a.resume_from:
            self._resume(a.resume_from)

    def _load_data(self) -> None:
        a = self.args
        fields = DataFields(a.messages_field, a.prompt_field, a.completion_field, a.text_field)
        train = load_records(a.train_file)
        eval_ds = load_records(a.eval_file) if a.eval_file else None
        if eval_ds is None and a.eval_fraction > 0:
            split = train.train_test_split(test_size=a.eval_fraction, seed=a.seed)
            train, eval_ds = split["train"], split["test"]
        self.fields = fields
        self.train_records = train
        self.eval_records = eval_ds
        rows = tokenize_dataset(train, self.tokenizer, fields, a.chat_template, a.mask_prompt, a.max_length)
        if not rows:
            raise ValueError(f"{a.train_file}: no example has a token to train on")
        self.train_rows = pack(rows, a.max_length, self.tokenizer.pad_token_id) if a.packing else rows
        self.eval_rows = (tokenize_dataset(eval_ds, self.tokenizer, fields, a.chat_template, a.mask_prompt,
                                           a.max_length) if eval_ds is not None else [])
        self.batches = GlobalBatches(len(self.train_rows), a.batch_size, self.world, a.grad_accum, a.seed)

    def _batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        rows = [self.train_rows[i] for i in self.batches.indices(step, micro, self.rank)]
        pad_to = self.args.max_length if self.args.packing else None
        return {k: v.to(self.accelerator.device) for k, v in collate(rows, self.tokenizer.pad_token_id, pad_to).items()}

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(self.ddp_model)
        params = dict(unwrapped.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.trainable}

    def save_checkpoint(self, step: int) -> Path:
        path = self.output_dir / f"checkpoint-{step}"
        acc = self.accelerator
        distributed = acc.distributed_type.value if hasattr(acc.distributed_type, "value") else str(acc.distributed_type)
        if distributed in ("FSDP", "DEEPSPEED"):
            acc.save_state(str(path))
        elif acc.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self._trainable_state().items()}, str(path / "trainable.safetensors"))
            torch.save({"optimizers": [o.state_dict() for o in self.optimizers],
                        "schedulers": [s.state_dict() for s in self.schedulers]}, path / "optim.pt")
        acc.wait_for_everyone()
        torch.save(_rng_state(), path / f"rng-{self.rank}.pt")
        if acc.is_main_process:
            (path / "state.json").write_text(json.dumps({"step": step, "history": self.history, "evals": self.evals,
                                                         "args": dataclasses.asdict(self.args)}, indent=1))
            limit = self.args.save_total_limit
            if limit:
                ckpts = sorted(self.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                for old in ckpts[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def _resume(self, where: str) -> None:
        path = _latest_checkpoint(self.output_dir) if where == "latest" else Path(where)
        if path is None or not path.exists():
            raise FileNotFoundError(f"--resume-from {where}: no checkpoint found (looked in {self.output_dir})")
        state = json.loads((path / "state.json").read_text())
        acc = self.accelerator
        if (path / "trainable.safetensors").exists():
            from safetensors.torch import load_file

            tensors = load_file(str(path / "trainable.safetensors"))
            unwrapped = acc.unwrap_model(self.ddp_model)
            params = dict(unwrapped.named_parameters())
            missing = set(self.trainable) - set(tensors)
            if missing:
                raise ValueError(f"{path}: checkpoint lacks trainable tensors {sorted(missing)[:5]}")
            with torch.no_grad():
                for n in self.trainable:
                    params[n].copy_(tensors[n].to(params[n].device, params[n].dtype))
            optim = torch.load(path / "optim.pt", weights_only=False)
            for o, s in zip(self.optimizers, optim["optimizers"]):
                o.load_state_dict(s)
            for sch, s in zip(self.schedulers, optim["schedulers"]):
                sch.load_state_dict(s)
        else:
            acc.load_state(str(path))
        rng = path / f"rng-{self.rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        self.start_step = int(state["step"])
        self.history = state["history"]
        self.evals = state["evals"]
        logger.info("resumed from %s at step %d", path, self.start_step)

    # --- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        acc = self.accelerator
        self.ddp_model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        count = torch.zeros((), dtype=torch.float64, device=acc.device)
        mine = self.eval_rows[self.rank::self.world]
        for i in range(0, len(mine), self.args.batch_size):
            batch = collate(mine[i:i + self.args.batch_size], self.tokenizer.pad_token_id)
            with acc.autocast():
                total, n, _ = self.ddp_model(**{k: v.to(acc.device) for k, v in batch.items()})
            loss_sum += total.double()
            count += n.double()
        loss_sum, count = acc.reduce(loss_sum, "sum"), acc.reduce(count, "sum")
        result = {"step": step, "eval_loss": float(loss_sum / count.clamp_min(1)), "eval_tokens": int(count)}
        if self.args.eval_generate and self.eval_records is not None:
            if acc.is_main_process:
                from .eval import exact_match

                records = [self.eval_records[i] for i in range(min(self.args.eval_generate, len(self.eval_records)))]
                with acc.autocast():
                    em = exact_match(acc.unwrap_model(self.ddp_model).lm, self.tokenizer, records,
                                     prompt_field=self.args.prompt_field, answer_field=self.args.completion_field,
                                     chat_template=self.args.chat_template, max_new_tokens=self.args.max_new_tokens)
                result["exact_match"] = em["exact_match"]
            acc.wait_for_everyone()
        self.ddp_model.train()
        return result

    # --- the loop ---------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        a = self.args
        micro = [self._batch(step, j) for j in range(a.grad_accum)]
        loss, n_global, grad_norm = optimizer_step(self.ddp_model, self.optimizers, micro, self.accelerator,
                                                   max_grad_norm=a.max_grad_norm,
                                                   router_aux_loss_coef=a.router_aux_loss_coef,
                                                   schedulers=self.schedulers)
        clipped = self.qk_clip.apply() if self.qk_clip is not None else 0
        row = {"step": step + 1, "loss": float(loss), "lr": self.schedulers[0].get_last_lr()[0],
               "tokens": int(n_global)}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.qk_clip is not None:
            row["qk_clipped_heads"] = clipped
        return row

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        self.setup()
        acc, a = self.accelerator, self.args
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ddp_model.train()
        start = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc="finetune",
                   disable=not (a.progress and acc.is_local_main_process))
        tokens = 0
        if a.eval_steps and self.eval_rows and self.start_step == 0:
            self.evals.append(self.evaluate(0))  # the starting point, for the learning curve
        for step in range(self.start_step, self.total_steps):
            row = self.train_step(step)
            tokens += row["tokens"]
            row["elapsed_s"] = round(time.perf_counter() - start, 3)
            self.history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if a.eval_steps and self.eval_rows and ((step + 1) % a.eval_steps == 0 or step + 1 == self.total_steps):
                ev = self.evaluate(step + 1)
                self.evals.append(ev)
                bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in ev.items()))
            if a.save_steps and (step + 1) % a.save_steps == 0 and step + 1 < self.total_steps:
                self.save_checkpoint(step + 1)
        bar.close()
        summary = self.finish(time.perf_counter() - start, tokens)
        return summary

    # --- end of training --------------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        import accelerate
        import transformers

        s = dataclasses.asdict(self.args)
        s.update(world_size=self.world, device=str(self.accelerator.device),
                 distributed=str(self.accelerator.distributed_type), torch=torch.__version__,
                 transformers=transformers.__version__, accelerate=accelerate.__version__,
                 total_steps=self.total_steps, global_batch_rows=self.args.batch_size * self.world * self.args.grad_accum,
                 train_rows=len(self.train_rows), eval_rows=len(self.eval_rows),
                 trainable_parameters=sum(p.numel() for p in self.loss_model.parameters() if p.requires_grad))
        if not self.args.full:
            import peft

            s["peft"] = peft.__version__
            s["lora_targets"] = {k: (sorted(v) if isinstance(v, (set, list)) else v) for k, v in self.targets.items()}
        return s

    def replica_checksums(self) -> list[float]:
        """One number per process summarising its trainable tensors: equal on every rank when replicas agree."""
        acc = self.accelerator
        local = torch.tensor([sum(float(p.detach().double().abs().sum() + p.detach().double().sum())
                                  for n, p in acc.unwrap_model(self.ddp_model).named_parameters() if p.requires_grad)],
                             dtype=torch.float64, device=acc.device)
        return [float(x) for x in acc.gather(local).cpu()]

    def finish(self, seconds: float, tokens: int) -> dict[str, Any]:
        acc = self.accelerator
        checksums = self.replica_checksums()
        summary = {"settings": self.settings(), "history": self.history, "evals": self.evals,
                   "replica_checksums": checksums,
                   "train_seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                   "final_loss": self.history[-1]["loss"] if self.history else None}
        if self.qk_clip is not None:
            summary["qk_clipped_heads"] = self.qk_clip.clipped_heads
            self.qk_clip.remove()
        acc.wait_for_everyone()
        if acc.is_main_process:
            (self.output_dir / "log.json").write_text(json.dumps(summary, indent=1))
            if self.args.plot:
                plot_losses(self.history, self.evals, self.output_dir / "loss.png")
        if self.args.save or self.args.push_to_hub:
            save_dir = Path(self.args.save) if self.args.save else self.output_dir / "final"
            self.save_artifacts(save_dir, summary)
            summary["saved"] = str(save_dir)
            if self.args.push_to_hub and acc.is_main_process:
                summary["pushed"] = push_to_hub(save_dir, self.args.push_to_hub, private=self.args.hub_private)
        acc.wait_for_everyone()
        return summary

    def save_artifacts(self, save_dir: Path, summary: dict[str, Any]) -> None:
        """What `--push-to-hub` uploads: the adapter (or merged / full model), the tokenizer, a model card."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.ddp_model)
        distributed = str(acc.distributed_type)
        state = acc.get_state_dict(self.ddp_model) if ("FSDP" in distributed or "DEEPSPEED" in distributed) else None
        if not acc.is_main_process:
            return
        save_dir.mkdir(parents=True, exist_ok=True)
        model = self.model
        if state is not None:
            unwrapped.load_state_dict(state)
        if self.args.full:
            model.save_pretrained(save_dir)
            kind = "full"
        elif self.args.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(save_dir)
            self.model = merged
            kind = "merged"
        else:
            model.save_pretrained(save_dir)
            kind = "adapter"
        self.tokenizer.save_pretrained(save_dir)
        (save_dir / "training_log.json").write_text(json.dumps(summary, indent=1))
        (save_dir / "README.md").write_text(model_card(summary, kind, self))


# ----------------------------------------------------------------------------------------------------------------
# Model card, hub, plot
# ----------------------------------------------------------------------------------------------------------------
def model_card(summary: dict[str, Any], kind: str, run: Finetune | None = None) -> str:
    s = summary["settings"]
    base = s.get("model") or f"tiny random {s.get('tiny')} (hf_archs.tour sizes)"
    lines = ["---", f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
             f"base_model: {base}" if s.get("model") else "", "tags:", "- hf_archs", "- sft",
             f"- {'lora' if kind != 'full' else 'full-finetune'}", "---", "",
             f"# {Path(s.get('save') or s['output_dir']).name}", "",
             f"Supervised fine-tune of `{base}` with `hf-archs finetune` ({kind}"
             + (": LoRA adapter, load with `peft.PeftModel.from_pretrained`" if kind == "adapter" else "") + ").", "",
             "## Training details", "", "| setting | value |", "|---|---|"]
    keys = ["train_file", "eval_file", "chat_template", "mask_prompt", "packing", "max_length", "full", "lora_r",
            "lora_alpha", "lora_dropout", "optimizer", "lr", "lr_scheduler", "warmup_steps", "weight_decay",
            "batch_size", "grad_accum", "global_batch_rows", "world_size", "total_steps", "precision",
            "gradient_checkpointing", "loss_chunk_size", "qk_clip", "seed", "trainable_parameters", "train_rows",
            "device", "torch", "transformers", "peft", "accelerate"]
    lines += [f"| {k} | {s[k]} |" for k in keys if k in s]
    lines += ["", "## Results", "", f"- final training loss: {summary.get('final_loss')}",
              f"- training time: {summary.get('train_seconds')} s, {summary.get('tokens_per_second')} target tokens/s"]
    for ev in summary.get("evals", [])[-1:]:
        lines += [f"- step {ev['step']}: " + ", ".join(f"{k} {v}" for k, v in ev.items() if k != "step")]
    if s.get("lora_targets"):
        lines += ["", "## LoRA targets", "", "```", json.dumps(s["lora_targets"], indent=1), "```"]
    if summary.get("eval_results"):
        lines += ["", "## Evaluation", "", "```", json.dumps(summary["eval_results"], indent=1), "```"]
    return "\n".join(line for line in lines if line is not None) + "\n"


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True,
                commit_message: str = "hf-archs finetune") -> str:
    """Upload `folder` (what `--save` wrote) to the Hub repo `repo_id`, creating it if needed."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def _png(width: int, height: int, pixels: bytearray) -> bytes:
    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_losses(history: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Training (blue) and evaluation (red) loss against steps as a PNG: matplotlib when installed, otherwise a
    plain raster drawn here (axes box and the two polylines, log-free linear scale)."""
    path = Path(path)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(steps, losses, label="train")
        if evals:
            ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    except ImportError:
        pass
    w, h, m = 640, 400, 30
    px = bytearray([255] * (w * h * 3))
    ys = losses + [e["eval_loss"] for e in evals]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    x_hi = max(steps + [e["step"] for e in evals] + [1])

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < w and 0 <= y < h:
            px[(y * w + x) * 3:(y * w + x) * 3 + 3] = bytes(rgb)

    def to_px(step: float, loss: float) -> tuple[int, int]:
        return (m + int((w - 2 * m) * step / x_hi), h - m - int((h - 2 * m) * (loss - lo) / (hi - lo)))

    def line(p: tuple[int, int], q: tuple[int, int], rgb: tuple[int, int, int]) -> None:
        n = max(abs(q[0] - p[0]), abs(q[1] - p[1]), 1)
        for i in range(n + 1):
            put(p[0] + (q[0] - p[0]) * i // n, p[1] + (q[1] - p[1]) * i // n, rgb)

    for a_, b_ in (((m, m), (w - m, m)), ((w - m, m), (w - m, h - m)), ((w - m, h - m), (m, h - m)), ((m, h - m), (m, m))):
        line(a_, b_, (0, 0, 0))
    for series, rgb in ((list(zip(steps, losses)), (31, 119, 180)),
                        ([(e["step"], e["eval_loss"]) for e in evals], (214, 39, 40))):
        pts = [to_px(s, v) for s, v in series]
        for p, q in zip(pts, pts[1:]):
            line(p, q, rgb)
        for p in pts[:1] if len(pts) == 1 else []:
            put(*p, rgb)
    path.write_bytes(_png(w, h, px))
    return path


# ----------------------------------------------------------------------------------------------------------------
# API and CLI
# ----------------------------------------------------------------------------------------------------------------
def finetune(**kwargs: Any) -> dict[str, Any]:
    """Run the recipe with `FinetuneArgs(**kwargs)`; returns the summary (also written to output_dir/log.json)."""
    return Finetune(FinetuneArgs(**kwargs)).run()


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneArgs()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="model directory: this package's layout or an official release")
    g.add_argument("--tiny", metavar="ARCH", help="instead of --model: a tiny random model of ARCH (examples, tests)")
    g.add_argument("--tiny-init-std", type=float, default=None,
                   help="--tiny: initializer_range of the random weights (larger = a peakier head, as trained "
                        "models have)")
    g.add_argument("--tiny-config", default=None, metavar="JSON",
                   help='--tiny: config overrides, e.g. \'{"num_hidden_layers": 2}\'')
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's; 'builtin' = the package's "
                                       "character tokenizer, the default with --tiny)")
    g.add_argument("--train-file", required=True, help="json, jsonl, csv, parquet or txt file")
    g.add_argument("--eval-file", help="held-out file in the same format")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="hold out this fraction of --train-file when there is no --eval-file")
    for f in ("messages", "prompt", "completion", "text"):
        g.add_argument(f"--{f}-field", default=getattr(d, f"{f}_field"), help=f"record field with the {f}")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                   help="plain text: prompt + completion + eos (default: the tokenizer's chat template)")
    g.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                   help="train on the prompt tokens too (default: only on the completion)")
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--packing", action="store_true", help="pack examples into rows of --max-length")
    g = p.add_argument_group("what is trained")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    g.add_argument("--lora-r", type=int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    for grp in ("attention", "mlp", "shared-experts", "experts", "router"):
        g.add_argument(f"--{grp}", choices=sorted(GROUP_CHOICES), default=getattr(d, grp.replace("-", "_")),
                       help=f"LoRA on {grp}: on = required, auto = where present, off (see hf_archs.lora_targets)")
    g.add_argument("--experts-method", choices=["grouped", "peft"], default=d.experts_method,
                   help="routed experts: per-expert low rank (grouped) or PEFT's target_parameters")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 = no clipping")
    g.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], default=d.lr_scheduler)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--qk-clip", type=float, default=None, metavar="TAU",
                   help="Kimi's QK-clip at this max attention logit (full fine-tuning, no QK-norm)")
    g.add_argument("--router-aux-loss-coef", type=float, default=d.router_aux_loss_coef,
                   help="add the load-balancing loss of MoE routers times this (when training the router)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per process per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--epochs", type=float, default=None, help="overrides --max-steps")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision,
                   help="bf16: autocast, and a frozen bf16 base under LoRA (adapters stay fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    g.add_argument("--loss-chunk-size", type=int, default=d.loss_chunk_size,
                   help="tokens per chunk of the fused head + cross-entropy (0 = one chunk); the only "
                        "[tokens, vocab] tensors alive are one chunk's logits and softmax")
    g.add_argument("--attn-implementation", default=None, help="eager, sdpa, ...")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-steps", type=int, default=d.eval_steps, help="evaluate every N steps (0 = never)")
    g.add_argument("--eval-generate", type=int, default=d.eval_generate,
                   help="also greedy-generate this many eval prompts and report exact match")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (0 = never)")
    g.add_argument("--save-total-limit", type=int, default=None)
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--resume-from", help="a checkpoint directory, or 'latest' in --output-dir")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g = p.add_argument_group("what is kept")
    g.add_argument("--save", metavar="DIR", help="write the adapter (or merged model), tokenizer and model card")
    g.add_argument("--merge", action="store_true", help="merge the adapter into the base before saving")
    g.add_argument("--push-to-hub", metavar="REPO", help="upload what --save writes to this Hub repo")
    g.add_argument("--public", dest="hub_private", action="store_false", help="create the Hub repo public")


def args_from_namespace(ns: argparse.Namespace) -> FinetuneArgs:
    names = {f.name for f in dataclasses.fields(FinetuneArgs)}
    return FinetuneArgs(**{k: v for k, v in vars(ns).items() if k in names})


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning (LoRA or full) on a local dataset; "
                                        "runs under accelerate launch / torchrun unchanged",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = Finetune(args_from_namespace(ns)).run()
    if summary.get("final_loss") is not None:
        print(json.dumps({k: summary[k] for k in ("final_loss", "train_seconds", "tokens_per_second")
                          if k in summary} | {"evals": summary["evals"][-1:], "saved": summary.get("saved")}))
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """`python -m hf_archs.finetune ...` (what `accelerate launch` runs)."""
    p = argparse.ArgumentParser(prog="python -m hf_archs.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return _cmd_finetune(p.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":
    raise SystemExit(main())

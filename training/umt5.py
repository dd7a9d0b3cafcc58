"""Wan's text encoder, umT5-XXL, through ``transformers`` (an optional dependency: ``pip install
self-forcing-stream[train]``), as a prompt-store encoder: list[str] -> one [tokens, 4096] tensor per prompt.

It does what Wan2.1's ``T5EncoderModel`` does: the text is cleaned (``ftfy`` when installed, HTML entities
unescaped twice, runs of whitespace collapsed), tokenized with the umT5 tokenizer (end-of-sequence token
added, at most 512 tokens), encoded with the padding masked out, and each prompt keeps its real tokens only.

Weights, all local (nothing is downloaded):

- a ``transformers`` folder (``config.json`` + weights) of a ``UMT5EncoderModel``, or a diffusers pipeline
  folder with ``text_encoder/`` and ``tokenizer/``;
- Wan's release file ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own key names, converted here);
- a single ``.safetensors`` with transformers' key names, e.g. ComfyUI's ``umt5_xxl_fp16.safetensors``
  (fp8 files with ``scale_weight`` tensors are dequantised to ``dtype``).

The tokenizer is a folder ``AutoTokenizer`` reads (Wan's release ships it as ``google/umt5-xxl`` beside the
weights, with ``tokenizer.json``); it is found next to the weights or given explicitly.
"""

from __future__ import annotations

import html
import os
import re

import torch

WAN_TEXT_LEN = 512

# Wan's T5 module names -> transformers' UMT5 names (per block i).
_WAN_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("encoding prompts with umT5 needs the 'transformers' package: "
                          "pip install 'self-forcing-stream[train]' (or pip install transformers)") from e
    return transformers


def wan_clean(text: str) -> str:
    """Wan's prompt cleaning ('whitespace'): fix mojibake (ftfy, when installed), unescape HTML twice,
    collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def wan_to_hf_keys(sd: dict) -> dict:
    """Wan2.1 T5 encoder state dict (``blocks.N.attn.q.weight`` ...) -> transformers UMT5EncoderModel names."""
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out["shared.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        else:
            m = _WAN_BLOCK.match(k)
            if not m or m.group(2) not in _WAN_BLOCK_KEYS:
                raise ValueError(f"unexpected key {k!r} in a Wan T5 encoder state dict")
            out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK_KEYS[m.group(2)]}"] = v
    return out


def umt5_state_dict(sd: dict, dtype: torch.dtype) -> dict:
    """Any supported umT5 encoder state dict -> transformers' keys in ``dtype`` (fp8 ``scale_weight``
    dequantised; decoder, LM head and tokenizer entries dropped)."""
    sd = {k: v for k, v in sd.items() if k not in ("spiece_model", "scaled_fp8") and not k.endswith(".scale_input")}
    if any(k.startswith("blocks.") or k == "token_embedding.weight" for k in sd):
        sd = wan_to_hf_keys(sd)
    final = [k for k in sd if k.endswith("encoder.final_layer_norm.weight")]
    if len(final) != 1:
        raise ValueError("not a umT5 encoder state dict: no (or several) 'encoder.final_layer_norm.weight' "
                         f"(keys: {sorted(sd)[:6]} ...)")
    prefix = final[0][: -len("encoder.final_layer_norm.weight")]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder.") or k == "lm_head.weight" or k.endswith(".scale_weight"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        v = v.to(torch.float32) * scale.to(torch.float32) if scale is not None else v
        out[k] = v.to(dtype)
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["shared.weight"] = out["encoder.embed_tokens.weight"]
    if "shared.weight" not in out:
        raise ValueError("not a umT5 encoder state dict: no token embedding ('shared.weight')")
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_config(sd: dict):
    """The UMT5Config of a (transformers-keyed) encoder state dict, read from its shapes."""
    cfg_cls = _transformers().UMT5Config
    vocab, d_model = sd["shared.weight"].shape
    layers = sum(1 for k in sd if re.fullmatch(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight", k))
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    d_ff = sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]
    return cfg_cls(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=layers,
                   num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)


def _read_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) torch file cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _is_tokenizer_dir(d: str) -> bool:
    return os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f))
                                    for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def find_tokenizer(weights: str) -> str:
    """The tokenizer folder next to ``weights``: <folder>/tokenizer, <dir>/google/umt5-xxl, <dir>/tokenizer,
    or the folder itself."""
    base = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
    parent = os.path.dirname(os.path.abspath(base))
    for d in (os.path.join(base, "tokenizer"), os.path.join(base, "google", "umt5-xxl"), base,
              os.path.join(parent, "tokenizer"), os.path.join(parent, "google", "umt5-xxl")):
        if _is_tokenizer_dir(d):
            return d
    raise ValueError(f"no tokenizer found next to {weights}; pass the tokenizer folder (Wan's release ships it "
                     "as google/umt5-xxl, a diffusers folder as tokenizer/)")


class UMT5TextEncoder:
    """A loaded umT5 encoder + tokenizer: ``encoder(texts)`` -> [tokens_i, dim] tensors on the CPU."""

    def __init__(self, model, tokenizer, *, device="cpu", max_tokens: int = WAN_TEXT_LEN, clean: bool = True,
                 name: str = "umt5"):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.tokenizer.padding_side = "right"
        self.device, self.max_tokens, self.clean, self.name = torch.device(device), max_tokens, clean, name
        self.dim = model.config.d_model

    def tokenize(self, texts: list) -> dict:
        texts = [wan_clean(t) for t in texts] if self.clean else list(texts)
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                              add_special_tokens=True, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, texts: list) -> list[torch.Tensor]:
        enc = self.tokenize(list(texts))
        mask = enc["attention_mask"]
        h = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask.to(self.device))
        h = h.last_hidden_state.to("cpu")
        return [h[i, :n].clone() for i, n in enumerate(mask.sum(1).tolist())]


def load_umt5(path: str, tokenizer: str | None = None, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
              max_tokens: int = WAN_TEXT_LEN, clean: bool = True) -> UMT5TextEncoder:
    """Load umT5 weights (a transformers or diffusers folder, Wan's .pth, or a single .safetensors) and its
    tokenizer (``tokenizer`` folder, else found next to the weights) onto ``device``."""
    tf = _transformers()
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        folder = path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            folder = os.path.join(path, "text_encoder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"{path} has no config.json (nor text_encoder/config.json): pass a transformers "
                             "UMT5 folder, a diffusers pipeline folder, or the weights file itself")
        major, minor = (int(x) for x in tf.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = tf.UMT5EncoderModel.from_pretrained(folder, local_files_only=True, **{key: dtype})
    elif os.path.isfile(path):
        sd = umt5_state_dict(_read_weights(path), dtype)
        with torch.device("meta"):
            model = tf.UMT5EncoderModel(umt5_config(sd))
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{path}: not a umT5 encoder of the inferred shape (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})")
    else:
        raise ValueError(f"umT5 weights not found: {path}")
    tok_dir = tokenizer or find_tokenizer(path)
    tok = tf.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    name = f"umt5({os.path.basename(os.path.normpath(path))}, d_model={model.config.d_model}, " \
           f"layers={model.config.num_layers}, max_tokens={max_tokens})"
    return UMT5TextEncoder(model.to(device), tok, device=device, max_tokens=max_tokens, clean=clean, name=name)

"""Self-contained toy models in the nodes: their three specs, the bundled checkpoint, prompts, decoding (no
ComfyUI import).

A toy bundle (``assets/self_forcing_toy.safetensors``) holds a small causal Wan DiT plus its own text encoder
and latent codec (``toy.bundle``). Its nodes:

- 'Load Self Forcing Toy Model': ``toy_model_path(name)`` + ``nodes.model.load_handle``;
- 'Self Forcing Toy Text Encode': ``encode_toy_prompt(handle, text)`` -> a CONDITIONING for the Stream Sampler
  (refuses words outside the encoder's vocabulary, listing it);
- 'Self Forcing Toy Decode': ``decode_toy_latent(handle, latent)`` -> a core IMAGE batch [frames, H, W, 3].

The sampler's LATENT of a toy model is in the toy format of ``latent`` (the model's own latents, tagged).
"""

from __future__ import annotations

import os

import torch

from ..toy.bundle import TEXT_PART, encode_prompt, is_toy_bundle, latents_to_frames, toy_parts
from .latent import TEXT_KEY, part_id, toy_space
from .model import DEVICES, ModelHandle, describe
from .schema import CAT_TOY, MODEL_TYPE, InputSpec, NodeSpec, OutputSpec

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SPECIAL_TOKENS = ("<unk>", "<pad>")
# Self-contained toy checkpoints shipped in the pack's assets/ folder (the toy loader's choices).
TOY_MODELS = ("self_forcing_toy.safetensors",)
TOY_PROMPT = "a red circle and a blue square bouncing on a black background"


def _toy_model_input(what: str) -> InputSpec:
    return InputSpec("model", MODEL_TYPE, f"A self-contained toy model (from 'Load Self Forcing Toy Model'), whose "
                     f"bundled {what} is used. Use the same model as the Stream Sampler. Wan models are refused.")


TOY_LOADER = NodeSpec(
    node_id="SelfForcingToyModelLoader",
    display_name="Load Self Forcing Toy Model",
    category=CAT_TOY,
    description="Loads a self-contained toy Self Forcing model shipped with the pack (a small causal Wan DiT with "
                "its own text encoder and latent codec in one file; 64x64 videos, runs on a CPU in seconds). "
                "Encode prompts with 'Self Forcing Toy Text Encode' and decode with 'Self Forcing Toy Decode'.",
    inputs=(
        InputSpec("model_name", "COMBO",
                  "Toy checkpoint in the pack's assets/ folder (no download needed). Your own exported toy "
                  "checkpoints load from models/diffusion_models with 'Load Self Forcing Model'.",
                  default=TOY_MODELS[0], options=TOY_MODELS),
        InputSpec("device", "COMBO",
                  "Where the model runs. default: ComfyUI's main device (GPU); cpu: the CPU (fast enough for "
                  "this small model). The weights stay loaded (about 12 MB).", default="default",
                  options=DEVICES),
    ),
    outputs=(
        OutputSpec(MODEL_TYPE, "model", "The toy model with its bundled text encoder and codec."),
        OutputSpec("STRING", "info", "What was loaded: size, frame size and rate, the words prompts may use."),
    ),
    search_aliases=("self forcing toy", "toy model", "demo model"),
)

TOY_ENCODE = NodeSpec(
    node_id="SelfForcingToyTextEncode",
    display_name="Self Forcing Toy Text Encode",
    category=CAT_TOY,
    description="Encodes a prompt with the text encoder bundled in a toy model, as the CONDITIONING the Stream "
                "Sampler takes. The toy encoder knows a few words (shapes, colours, 'bouncing on a ... "
                "background'); a prompt with any other word is refused with the list of known words.",
    inputs=(
        _toy_model_input("text encoder"),
        InputSpec("text", "STRING",
                  "The prompt, e.g. 'a red circle and a blue square bouncing on a black background'. Case, "
                  "commas and full stops are ignored; only the model's vocabulary (listed on the loader's info "
                  "output) is accepted, at most 16 words.", default=TOY_PROMPT, multiline=True),
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning", "The encoded prompt [1, 16, 4096] for the Stream Sampler's "
                        "positive input (tagged so that only toy models accept it)."),),
    search_aliases=("toy prompt", "toy text"),
)

TOY_DECODE = NodeSpec(
    node_id="SelfForcingToyDecode",
    display_name="Self Forcing Toy Decode",
    category=CAT_TOY,
    description="Decodes the Stream Sampler's LATENT of a toy model with the model's bundled codec into an IMAGE "
                "batch (one image per frame) for core Create Video -> Save Video. Wan latents are refused (use "
                "VAE Decode for those).",
    inputs=(
        _toy_model_input("codec"),
        InputSpec("latent", "LATENT",
                  "The LATENT output of 'Self Forcing Stream Sampler' (or Extend Video) running this toy model: the "
                  "model's own latents, one per frame, tagged as toy latents. Connect it directly: core latent "
                  "nodes may drop the tag."),
    ),
    outputs=(OutputSpec("IMAGE", "images", "The video frames [frames, height, width, 3] in 0-1 (batch items one "
                        "after the other), for core CreateVideo."),),
    search_aliases=("toy decode", "toy codec"),
)


def toy_model_path(name: str, assets_dir: str = ASSETS_DIR) -> str:
    """Full path of a toy checkpoint shipped in the pack's assets/ folder."""
    base = os.path.basename(name)
    path = os.path.join(assets_dir, base)
    if base != name or not os.path.isfile(path):
        shipped = sorted(f for f in os.listdir(assets_dir) if f.endswith(".safetensors")) if os.path.isdir(assets_dir) else []
        raise ValueError(f"toy model '{name}' is not in the pack's assets folder {assets_dir} (it has: "
                         f"{', '.join(shipped) or 'nothing'}); reinstall the pack, or load your own toy "
                         "checkpoint from models/diffusion_models with 'Load Self Forcing Model'")
    return path


def require_toy(handle: ModelHandle, node: str) -> None:
    if not is_toy_bundle(handle.loaded):
        raise ValueError(f"'{node}' needs a self-contained toy model (one that bundles its own text encoder and "
                         f"codec, e.g. 'Load Self Forcing Toy Model'); '{handle.name}' is a Wan model: encode its "
                         "prompts with CLIPLoader (type 'wan') + CLIPTextEncode and decode its LATENT with VAE Decode")


# -- prompts --------------------------------------------------------------------------------------------
def toy_vocabulary(handle: ModelHandle) -> tuple[str, ...]:
    """The words the bundled text encoder knows (special tokens left out), in its own order."""
    enc, _ = toy_parts(handle.loaded)
    words = getattr(enc, "vocab", None) or tuple(getattr(enc, "index", {}))
    return tuple(w for w in words if w not in SPECIAL_TOKENS)


def max_words(handle: ModelHandle) -> int:
    enc, _ = toy_parts(handle.loaded)
    return int(getattr(enc, "max_len", None) or getattr(enc, "text_len", None) or handle.config.text_len)


def prompt_words(text: str) -> list[str]:
    """Lower-case words of a prompt; commas and full stops separate words and are dropped."""
    return str(text).lower().replace(",", " ").replace(".", " ").split()


def encode_toy_prompt(handle: ModelHandle, text: str) -> list:
    """A one-prompt CONDITIONING [[context [1, text_len, text_dim] (float32, CPU), {...}]] for a toy model.

    The words are checked against the encoder's vocabulary first (an unknown word raises ValueError listing the
    vocabulary); the prompt handed to the encoder is the checked words joined by spaces. The entry's dict is
    tagged with the encoder's id, so the sampler can refuse the prompt for any other model.
    """
    require_toy(handle, "Self Forcing Toy Text Encode")
    vocab = toy_vocabulary(handle)
    example = TOY_PROMPT
    words = prompt_words(text)
    if not words:
        raise ValueError(f"the prompt is empty; describe shapes and a background, e.g. '{example}'. "
                         f"Known words: {', '.join(vocab)}")
    known = set(vocab)
    unknown = list(dict.fromkeys(w for w in words if w not in known))
    if unknown:
        raise ValueError(f"the toy model does not know the word{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(w) for w in unknown)}; it knows only: {', '.join(vocab)} "
                         f"(e.g. '{example}')")
    limit = max_words(handle)
    if len(words) > limit:
        raise ValueError(f"the prompt has {len(words)} words but the toy text encoder reads at most {limit}; "
                         "describe fewer shapes")
    context = encode_prompt(handle.loaded, " ".join(words), device="cpu").to(torch.float32)
    return [[context, {"pooled_output": None, TEXT_KEY: part_id(handle.loaded, TEXT_PART)}]]


# -- decoding ---------------------------------------------------------------------------------------------
def decode_toy_latent(handle: ModelHandle, latent) -> torch.Tensor:
    """A toy LATENT (from the Stream Sampler running this model) -> core IMAGE [B*F, H, W, 3] in [0, 1]
    (float32, CPU): the bundled codec applied to the samples as they are, batch items one after the other."""
    require_toy(handle, "Self Forcing Toy Decode")
    samples = toy_space(handle.loaded).unwrap(latent)
    channels = handle.config.out_dim
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != channels:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"a toy LATENT must be [batch, {channels}, frames, height, width], got {shape}")
    return latents_to_frames(handle.loaded, samples)


# -- the loader's report -----------------------------------------------------------------------------------
def describe_toy(handle: ModelHandle) -> str:
    """``describe`` plus what the bundle declares: frame size, frame rate, training clip, vocabulary."""
    info = handle.meta.get("toy", {})
    space = toy_space(handle.loaded)
    size = info.get("size")
    lines = [describe(handle),
             f"toy model: {size}x{size} frames at {info.get('fps', 8)} fps, trained on {info.get('train_frames')}-"
             f"frame clips; 1 latent frame = 1 video frame, latent = frame / {space.spatial}",
             f"prompt words: {', '.join(toy_vocabulary(handle))}"]
    return "\n".join(lines)

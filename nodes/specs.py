"""Declarative schemas of every node in the pack (plain data, no ComfyUI import).

The node classes build their ``io.Schema`` from these specs, and the CI tests check the shipped API
workflows against them without ComfyUI. Node ids are stable and inputs are only ever appended (a test
compares against a frozen record), so saved workflows keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROOT = "Self Forcing"
CAT_LOADERS = f"{ROOT}/loaders"
CAT_SAMPLING = f"{ROOT}/sampling"
CAT_CONDITIONING = f"{ROOT}/conditioning"
CAT_TOY = f"{ROOT}/toy"

# Custom socket types: our model is not a core MODEL (ModelPatcher), and the options bundle has no core twin.
MODEL_TYPE = "SELF_FORCING_MODEL"
OPTIONS_TYPE = "SELF_FORCING_OPTIONS"
LIVE_TYPE = "SELF_FORCING_LIVE_FRAMES"

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_MAX = 0xFFFFFFFFFFFFFFFF
DEFAULT_STEPS = "1000, 750, 500, 250"
DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTENTION = ("auto", "sdpa", "flash3", "flash2")
CACHE_POLICIES = ("fixed", "rolling")
EXTEND_OUTPUTS = ("joined", "new frames only", "joined, resampled history")
EMBED_FOLDERS = ("text_embeds", "output")
LIVE_FORMATS = ("jpeg", "png")
# Self-contained toy checkpoints shipped in the pack's assets/ folder (the toy loader's choices).
TOY_MODELS = ("self_forcing_toy.safetensors",)
TOY_PROMPT = "a red circle and a blue square bouncing on a black background"


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket type (LATENT, ...)
    tooltip: str
    default: Any = None
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    options: tuple = ()  # static COMBO options
    options_source: str | None = None  # dynamic COMBO options: a model folder name (files listed at runtime)
    optional: bool = False
    multiline: bool = False
    control_after_generate: bool = False
    display_name: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class OutputSpec:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...] = ()
    is_output_node: bool = False
    search_aliases: tuple[str, ...] = field(default_factory=tuple)

    def input(self, name: str) -> InputSpec:
        for i in self.inputs:
            if i.name == name:
                return i
        raise KeyError(f"{self.node_id} has no input '{name}'")


# -- inputs shared by the sampler and the extend node ------------------------------------------------
def _model_input() -> InputSpec:
    return InputSpec("model", MODEL_TYPE, "The Self Forcing model from 'Load Self Forcing Model' (or 'Load Self "
                     "Forcing Toy Model' for the bundled toy model).")


def _positive_input() -> InputSpec:
    return InputSpec(
        "positive", "CONDITIONING",
        "The prompt: umT5-XXL hidden states [1, tokens, 4096] from core CLIPLoader (type 'wan') + "
        "CLIPTextEncode, or from 'Load Text Embeddings'. Self Forcing uses no negative prompt (CFG is "
        "distilled into the model). Tokens beyond 512 are dropped, as in Wan. A toy model takes only prompts from "
        "'Self Forcing Toy Text Encode'.")


def _seed_input() -> InputSpec:
    return InputSpec("seed", "INT", "Random seed of the initial and re-injected noise. Same seed + same "
                     "inputs = same video on any device. Range 0 to 2^64-1.", default=0, min=0, max=SEED_MAX,
                     control_after_generate=True)


def _block_inputs() -> tuple[InputSpec, ...]:
    return (
        InputSpec("frames_per_block", "INT",
                  "Latent frames generated together per chunk (each latent frame is 4 video frames). Must "
                  "match how the checkpoint was trained: 3 for the official chunk-wise Self Forcing model, "
                  "1 for frame-wise models. Range 1-21.", default=3, min=1, max=21),
        InputSpec("steps", "STRING",
                  "Denoising timesteps per chunk, comma-separated, strictly decreasing, each in (0, 1000]. "
                  "They are warped onto the shifted schedule (see shift), as Self Forcing does. The default "
                  "4-step list is what the official checkpoint was distilled for; fewer steps are faster "
                  "and blurrier.", default=DEFAULT_STEPS),
        InputSpec("shift", "FLOAT",
                  "Timestep shift of the flow schedule used to warp the steps (Self Forcing: 5.0). 1.0 uses "
                  "the steps as they are. Range 1-20.", default=5.0, min=1.0, max=20.0, step=0.1),
        InputSpec("context_noise", "FLOAT",
                  "Timestep at which a finished chunk is written into the KV cache (0 = clean, as the "
                  "official checkpoint was trained). Small values (0-100) can reduce error build-up on "
                  "long videos. Range 0-1000.", default=0.0, min=0.0, max=1000.0, step=1.0),
    )


def _options_input() -> InputSpec:
    return InputSpec("options", OPTIONS_TYPE,
                     "Optional long-video settings from 'Self Forcing Long-Video Options' (rolling KV cache "
                     "window, attention sink, history routing). Not connected: one fixed cache for the whole "
                     "video, which is what the official checkpoint was trained with (up to 81 frames).",
                     optional=True)


def _decode_inputs() -> tuple[InputSpec, ...]:
    return (
        InputSpec("vae", "VAE",
                  "Optional: the Wan 2.1 VAE (VAELoader with wan_2.1_vae.safetensors). Connected: every chunk is "
                  "decoded as soon as it is generated (overlapped with sampling on a GPU), the IMAGE output holds "
                  "the video for CreateVideo, the progress bar shows the newest decoded frame and each chunk's "
                  "frames are sent to the client live (websocket event 'self_forcing.frames'). Not connected: "
                  "nothing is decoded and the IMAGE output must stay unconnected (decode the LATENT with VAE "
                  "Decode instead).", optional=True),
        InputSpec("live_frames", LIVE_TYPE,
                  "Optional settings for the frames sent to the client while decoding, from 'Self Forcing Live "
                  "Frames' (every n-th frame, size, JPEG/PNG, or off). Not connected: every frame, at most 512 "
                  "px, JPEG quality 85. Only used when a VAE is connected.", optional=True),
    )


def _image_output(what: str) -> OutputSpec:
    return OutputSpec("IMAGE", "images", f"{what} [frames, height, width, 3] in 0-1 for core CreateVideo, decoded "
                      "while sampling. Only filled when the 'vae' input is connected; without it any node using "
                      "this output stops with an error saying so.")


LOADER = NodeSpec(
    node_id="SelfForcingModelLoader",
    display_name="Load Self Forcing Model",
    category=CAT_LOADERS,
    description="Loads a Self Forcing / causal Wan 2.1 checkpoint (official .pt, converted safetensors, "
                "Wan/ComfyUI or diffusers layout) from models/diffusion_models and reports what it found.",
    inputs=(
        InputSpec("model_name", "COMBO",
                  "Checkpoint file in models/diffusion_models. Any layout the loader knows: the official "
                  "self_forcing_dmd.pt, its safetensors conversion, Wan/ComfyUI bare keys or diffusers names. "
                  "The official file name is listed even when missing (see download_if_missing).",
                  options_source="diffusion_models"),
        InputSpec("dtype", "COMBO",
                  "Weight and compute precision. auto: bf16 where the device supports it, else fp16 on GPUs "
                  "and fp32 on the CPU. fp32 needs twice the memory of bf16/fp16.",
                  default="auto", options=DTYPES),
        InputSpec("attention", "COMBO",
                  "Attention kernel. auto: flash-attn 3 or 2 if installed on a CUDA device, else PyTorch SDPA. "
                  "flash3/flash2 fail at load time when the flash-attn package is not installed.",
                  default="auto", options=ATTENTION),
        InputSpec("device", "COMBO",
                  "Where the model runs. default: ComfyUI's main device (GPU); cpu: the CPU (very slow, for "
                  "tests).", default="default", options=("default", "cpu")),
        InputSpec("keep_loaded", "BOOLEAN",
                  "Keep the weights on the GPU between runs (faster re-runs, but ComfyUI cannot free that "
                  "memory for other models such as the VAE). Off: weights go back to ComfyUI's offload "
                  "device after every run.", default=False),
        InputSpec("download_if_missing", "BOOLEAN",
                  "If the chosen file is one of the official ones and is missing, download it from Hugging "
                  "Face (resumable, checksum-checked; the .pt is converted to safetensors once). Offline "
                  "this fails at once with a message saying where to put the file by hand.",
                  default=False),
    ),
    outputs=(
        OutputSpec(MODEL_TYPE, "model", "The loaded causal Wan model with its devices and dtype."),
        OutputSpec("STRING", "info", "What was detected: size (1.3B/14B), layout, frames per block, dtype."),
    ),
    search_aliases=("self forcing", "causal wan", "wan streaming"),
)

OPTIONS = NodeSpec(
    node_id="SelfForcingLongVideoOptions",
    display_name="Self Forcing Long-Video Options",
    category=CAT_SAMPLING,
    description="KV-cache policy for videos longer than the training length: rolling window with an "
                "attention sink, and history routing. Connect to the sampler's or extend node's options.",
    inputs=(
        InputSpec("cache", "COMBO",
                  "fixed: one cache holding the whole video (exact for <= 81 frames, memory grows with "
                  "length). rolling: keep only the sink frames plus the last `window` latent frames "
                  "(bounded memory, any length).", default="rolling", options=CACHE_POLICIES),
        InputSpec("window", "INT",
                  "Rolling window in latent frames (1 latent frame = 4 video frames), the current chunk "
                  "included. 21 = the official training length (81 frames). Must be at least frames_per_block. "
                  "Ignored for 'fixed'. Range 1-1024.", default=21, min=1, max=1024),
        InputSpec("sink", "INT",
                  "Attention sink: the first N latent frames of the video stay in the cache forever (keeps "
                  "the scene anchored on long videos). 0 = none. Ignored for 'fixed'. Range 0-64.",
                  default=3, min=0, max=64),
        InputSpec("routing_topk", "INT",
                  "History routing: each chunk attends only to the k cached history frames whose mean-pooled "
                  "keys match it best, plus the sink and itself. 0 = off (attend to everything cached). "
                  "Useful values 3-12. Range 0-1024.", default=0, min=0, max=1024),
    ),
    outputs=(OutputSpec(OPTIONS_TYPE, "options", "Long-video settings for the sampler / extend node."),),
)

SAMPLER = NodeSpec(
    node_id="SelfForcingSampler",
    display_name="Self Forcing Stream Sampler",
    category=CAT_SAMPLING,
    description="Generates a video chunk by chunk with a KV cache (Self Forcing streaming). Outputs a Wan 2.1 "
                "LATENT for core VAEDecode; shows a preview of every finished chunk while it runs.",
    inputs=(
        _model_input(),
        _positive_input(),
        InputSpec("width", "INT", "Video width in pixels, a multiple of 16. Self Forcing was trained at "
                  "832x480. Range 16-4096.", default=832, min=16, max=4096, step=16),
        InputSpec("height", "INT", "Video height in pixels, a multiple of 16. Range 16-4096.",
                  default=480, min=16, max=4096, step=16),
        InputSpec("length", "INT", "Number of video frames, of the form 4k+1 (Wan's VAE packs 4 frames "
                  "per latent frame plus the first): 81 = 5 s at 16 fps. More than 81 needs the long-video "
                  "options (rolling cache). With a toy model every video frame is one latent frame (45 frames = "
                  "15 chunks of 3). Range 1-4093.", default=81, min=1, max=4093, step=4),
        _seed_input(),
        *_block_inputs(),
        _options_input(),
        *_decode_inputs(),
    ),
    outputs=(OutputSpec("LATENT", "latent", "Wan 2.1 video latent [1, 16, (length-1)/4+1, height/8, width/8] "
                        "for core VAEDecode (with a toy model: its own latents [1, 16, length, height/2, width/2] for "
                        "'Self Forcing Toy Decode')."),
             _image_output("The decoded video, length frames")),
    search_aliases=("self forcing", "stream", "autoregressive video", "causal video"),
)

EXTEND = NodeSpec(
    node_id="SelfForcingExtendVideo",
    display_name="Self Forcing Extend Video",
    category=CAT_SAMPLING,
    description="Continues a video LATENT (a previous output, or a video/image through core VAEEncode) by N "
                "frames. The last history frames are first re-noised and re-denoised by the model itself "
                "(self-resampling) so the context looks like its own output, then prefilled into the cache. "
                "Image-to-video is the one-frame case.",
    inputs=(
        _model_input(),
        _positive_input(),
        InputSpec("latent", "LATENT", "The video to continue: a Wan 2.1 LATENT (a sampler output, or "
                  "VAEEncode of a video or of one image for image-to-video)."),
        InputSpec("extend_frames", "INT", "Video frames to add, a multiple of 4 (4 frames per latent "
                  "frame). 80 turns one image into an 81-frame video. Range 4-4092.",
                  default=80, min=4, max=4092, step=4),
        InputSpec("history_frames", "INT", "How many of the last latent frames of the input are resampled "
                  "(re-noised and re-denoised by the model) before continuing; 0 = none. The whole input is "
                  "prefilled into the KV cache as context (a rolling cache keeps only its last window). 1 for "
                  "image-to-video, 3-6 for a video. Range 0-1024.", default=3, min=0, max=1024),
        InputSpec("resample_strength", "FLOAT", "How strongly the history is re-noised before the model "
                  "re-denoises it (0 = use the history exactly as it is; 1 = regenerate it from noise). "
                  "0.2-0.5 keeps the content and moves it into the model's own distribution. Range 0-1.",
                  default=0.3, min=0.0, max=1.0, step=0.01),
        _seed_input(),
        *_block_inputs(),
        InputSpec("output", "COMBO", "joined: the input video (bit-identical) followed by the new frames. "
                  "new frames only: just the continuation. joined, resampled history: the last history "
                  "frames replaced by their resampled version.", default="joined", options=EXTEND_OUTPUTS),
        _options_input(),
        *_decode_inputs(),
    ),
    outputs=(OutputSpec("LATENT", "latent", "The joined (or new-only) Wan 2.1 video latent."),
             _image_output("The decoded LATENT output (for 'new frames only': the extend_frames new frames, "
                           "decoded as the continuation of the input),")),
    search_aliases=("continue video", "image to video", "i2v", "video extension"),
)

LIVE = NodeSpec(
    node_id="SelfForcingLiveFrames",
    display_name="Self Forcing Live Frames",
    category=CAT_SAMPLING,
    description="How the sampler sends decoded frames to the client while it runs (when its 'vae' input is "
                "connected): on/off, every n-th frame, image size and format. Connect to the sampler's or extend "
                "node's live_frames input.",
    inputs=(
        InputSpec("send", "BOOLEAN", "Send each decoded chunk's frames to the client that queued the prompt "
                  "(websocket event 'self_forcing.frames'). Off: decode as it goes without sending frames (the "
                  "progress preview still shows the newest frame).", default=True),
        InputSpec("every_nth", "INT", "Send only frames whose index in the video is a multiple of this (1 = "
                  "every frame, 4 = one frame per latent frame). Range 1-64.", default=1, min=1, max=64),
        InputSpec("max_size", "INT", "Longest side of the sent images in pixels; larger frames are scaled "
                  "down, never up. 0 = full size. Range 0-4096.", default=512, min=0, max=4096, step=8),
        InputSpec("format", "COMBO", "jpeg: small, lossy. png: lossless, several times larger.",
                  default="jpeg", options=LIVE_FORMATS),
        InputSpec("quality", "INT", "JPEG quality (ignored for png). Range 1-100.", default=85, min=1, max=100),
    ),
    outputs=(OutputSpec(LIVE_TYPE, "live_frames", "Live frame settings for the sampler / extend node."),),
    search_aliases=("live preview", "stream frames", "websocket frames"),
)

SAVE_EMBEDS = NodeSpec(
    node_id="SelfForcingSaveTextEmbeds",
    display_name="Save Text Embeddings",
    category=CAT_CONDITIONING,
    description="Saves a CONDITIONING (umT5 hidden states) to a safetensors file, so later runs can load it "
                "with 'Load Text Embeddings' without keeping the 11 GB text encoder loaded.",
    inputs=(
        InputSpec("conditioning", "CONDITIONING", "The encoded prompt (CLIPTextEncode with a 'wan' CLIP)."),
        InputSpec("filename_prefix", "STRING", "File name prefix; a counter and .safetensors are added. May "
                  "contain sub-folders (e.g. 'cats/walk').", default="prompt"),
        InputSpec("folder", "COMBO", "text_embeds: models/text_embeds (listed by 'Load Text Embeddings'); "
                  "output: ComfyUI's output folder, under text_embeds/ (also listed).",
                  default="text_embeds", options=EMBED_FOLDERS),
    ),
    outputs=(OutputSpec("STRING", "filename", "The saved file, as 'Load Text Embeddings' lists it."),),
    is_output_node=True,
)

LOAD_EMBEDS = NodeSpec(
    node_id="SelfForcingLoadTextEmbeds",
    display_name="Load Text Embeddings",
    category=CAT_CONDITIONING,
    description="Loads text embeddings saved by 'Save Text Embeddings' as a CONDITIONING.",
    inputs=(
        InputSpec("embeds_name", "COMBO", "A .safetensors file in models/text_embeds or output/text_embeds.",
                  options_source="text_embeds"),
    ),
    outputs=(OutputSpec("CONDITIONING", "conditioning", "The saved prompt embedding [1, tokens, 4096]."),),
)

# -- self-contained toy models (DiT + bundled text encoder + codec in one file) ---------------------------
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
                  options=("default", "cpu")),
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

ALL_NODES: tuple[NodeSpec, ...] = (LOADER, OPTIONS, SAMPLER, EXTEND, LIVE, SAVE_EMBEDS, LOAD_EMBEDS, TOY_LOADER,
                                   TOY_ENCODE, TOY_DECODE)
NODES_BY_ID = {n.node_id: n for n in ALL_NODES}


# -- the /object_info view of a spec (what ComfyUI serves for our nodes) ----------------------------------
def _input_info(spec: InputSpec, options: list | None) -> list:
    opts: dict[str, Any] = {"tooltip": spec.tooltip}
    if spec.display_name:
        opts["display_name"] = spec.display_name
    if spec.type == "COMBO":
        values = list(options if options is not None else spec.options)
        if spec.default is not None and spec.default in values:
            opts["default"] = spec.default
        opts["multiselect"] = False
        opts["options"] = values
    elif spec.is_widget:
        for key in ("default", "min", "max", "step"):
            value = getattr(spec, key)
            if value is not None:
                opts[key] = value
        if spec.type == "INT" and spec.control_after_generate:
            opts["control_after_generate"] = True
        if spec.type == "STRING":
            opts["multiline"] = spec.multiline
    return [spec.type, opts]


def object_info(spec: NodeSpec, dynamic_options: dict[str, list] | None = None) -> dict:
    """The node's entry as ComfyUI's GET /object_info reports it (dynamic file lists from the argument)."""
    dynamic_options = dynamic_options or {}
    sections: dict[str, dict] = {"required": {}}
    for i in spec.inputs:
        section = "optional" if i.optional else "required"
        sections.setdefault(section, {})[i.name] = _input_info(i, dynamic_options.get(i.name))
    if spec.is_output_node:  # ComfyUI adds these hidden inputs to every V3 output node
        sections["hidden"] = {"prompt": ["PROMPT"], "extra_pnginfo": ["EXTRA_PNGINFO"]}
    return {
        "input": sections,
        "input_order": {k: list(v) for k, v in sections.items()},
        "output": [o.type for o in spec.outputs],
        "output_is_list": [False for _ in spec.outputs],
        "output_name": [o.name for o in spec.outputs],
        "output_tooltips": [o.tooltip for o in spec.outputs],
        "name": spec.node_id,
        "display_name": spec.display_name,
        "description": spec.description,
        "category": spec.category,
        "output_node": spec.is_output_node,
    }

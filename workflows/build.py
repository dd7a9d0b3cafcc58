"""The shipped workflows, defined once in Python and written in both formats.

    python -m self_forcing.workflows.build          # (re)write example_workflows/*.json and workflows/api/*.json
    python -m self_forcing.workflows.build --check  # exit 1 if the files on disk differ from the definitions

UI files (``example_workflows/``, listed by ComfyUI's template browser) are laid out left to right by
graph depth; API files (``workflows/api/``) are what batch jobs POST to ``/prompt``. A test converts
every UI file back to API format and compares it with its twin.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..sf_model import weights
from ..nodes.toy import TOY_MODELS, TOY_PROMPT
from ..sf_model.schedule import DEFAULT_STEPS_TEXT
from .schemas import REPO, all_schemas, ordered_inputs, widget_slots

UI_DIR = REPO / "example_workflows"
API_DIR = REPO / "workflows" / "api"
PACK_ID = "self-forcing-stream"
PACK_VERSION = "0.1.0"
CORE_VERSION = "0.3.64"
FPS = 16.0
PROMPT = ("A red fox trots through fresh snow in a quiet birch forest at sunrise, soft golden light, "
          "breath visible in the cold air, the camera tracking alongside at eye level, cinematic, detailed fur.")
EXTEND_PROMPT = ("The scene continues naturally: the same subject keeps moving in the same direction, "
                 "same lighting and camera motion, cinematic, detailed.")
I2V_PROMPT = ("The scene in the picture comes to life: gentle natural motion, a slow camera push-in, "
              "soft light, cinematic, detailed.")


@dataclass(frozen=True)
class Link:
    node: int
    slot: int = 0


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str | None = None


@dataclass
class Graph:
    name: str
    description: str
    nodes: list[Node] = field(default_factory=list)
    note: str = ""

    def add(self, type_: str, title: str | None = None, **inputs) -> Link:
        node = Node(len(self.nodes) + 1, type_, inputs, title)
        self.nodes.append(node)
        return Link(node.id)


# -- building blocks -------------------------------------------------------------------------------
def files_note(text_encoder: bool = True, extra: str = "") -> str:
    """The 'Read me' note of a UI workflow: which files it needs and where they come from."""
    lines = [
        "## Files this workflow needs",
        f"- `models/diffusion_models/{weights.SELF_FORCING.name}`: Self Forcing ([{weights.SELF_FORCING.repo_path}]"
        f"({weights.SELF_FORCING.url})); `self-forcing download` fetches and converts it, or tick "
        "*download_if_missing* on the loader",
        f"- `models/vae/{weights.WAN_VAE.name}` ([download]({weights.WAN_VAE.url}))",
    ]
    if text_encoder:
        lines.append(f"- `models/text_encoders/{weights.UMT5.name}` ([download]({weights.UMT5.url}))")
    return "\n".join(lines) + "\n" + extra


def _loader(g: Graph) -> Link:
    return g.add("SelfForcingModelLoader", model_name=weights.SELF_FORCING.name, dtype="auto", attention="auto",
                 device="default", keep_loaded=False, download_if_missing=False, lora_name="none",
                 lora_strength=1.0)


def _prompt(g: Graph, text: str) -> Link:
    clip = g.add("CLIPLoader", clip_name=weights.UMT5.name, type="wan", device="default")
    return g.add("CLIPTextEncode", "Prompt", text=text, clip=clip)


def _vae(g: Graph) -> Link:
    return g.add("VAELoader", vae_name=weights.WAN_VAE.name)


def _save(g: Graph, latent: Link, vae: Link, prefix: str, fps=FPS) -> None:
    images = g.add("VAEDecode", samples=latent, vae=vae)
    video = g.add("CreateVideo", images=images, fps=fps)
    # "format.codec": the codec as newer cores (2026) name it; older cores read "codec" and ignore it.
    g.add("SaveVideo", video=video, filename_prefix=prefix, format="auto", codec="auto", **{"format.codec": "auto"})


def _sampling(**over) -> dict:
    base = dict(seed=42, frames_per_block=3, steps=DEFAULT_STEPS_TEXT, shift=5.0, context_noise=0.0)
    base.update(over)
    return base


# -- the workflows ---------------------------------------------------------------------------------
def t2v_stream() -> Graph:
    g = Graph("self_forcing_t2v_stream_81f", "Text to video, streamed chunk by chunk: 81 frames (5 s) at 832x480.",
              note=files_note())
    model = _loader(g)
    positive = _prompt(g, PROMPT)
    vae = _vae(g)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=81,
                   **_sampling())
    _save(g, latent, vae, "video/self_forcing_t2v")
    return g


def t2v_stream_decode() -> Graph:
    g = Graph("self_forcing_t2v_stream_decode",
              "Text to video, decoded as it goes: the sampler decodes every chunk with the VAE while it generates "
              "the next one, shows the newest frame on its progress bar and sends each chunk's frames to the "
              "client live (websocket event 'self_forcing.frames'; see examples/live_frames_client.py). Its IMAGE "
              "output goes straight to Create Video: no VAE Decode at the end.",
              note=files_note())
    model = _loader(g)
    positive = _prompt(g, PROMPT)
    vae = _vae(g)
    live = g.add("SelfForcingLiveFrames", send=True, every_nth=1, max_size=512, format="jpeg", quality=85)
    sampler = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=81,
                    **_sampling(), vae=vae, live_frames=live)
    video = g.add("CreateVideo", images=Link(sampler.node, 1), fps=FPS)
    g.add("SaveVideo", video=video, filename_prefix="video/self_forcing_t2v_live", format="auto", codec="auto",
          **{"format.codec": "auto"})
    return g


def long_video() -> Graph:
    g = Graph("self_forcing_long_video_rolling_30s",
              "Long video with a rolling KV cache (window 21 latent frames + 3 sink frames): 477 frames, "
              "about 30 s at 16 fps. Memory stays flat whatever the length.", note=files_note())
    model = _loader(g)
    positive = _prompt(g, PROMPT)
    vae = _vae(g)
    options = g.add("SelfForcingLongVideoOptions", cache="rolling", window=21, sink=3, routing_topk=0,
                    positions="absolute", kv_fp8=False)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=477,
                   **_sampling(), options=options)
    _save(g, latent, vae, "video/self_forcing_long")
    return g


def extend() -> Graph:
    g = Graph("self_forcing_extend_video",
              "Extend a video by 80 frames: the input is VAE-encoded, its last 3 latent frames are resampled "
              "by the model (strength 0.3), then streaming continues. Put the video in ComfyUI's input folder.",
              note=files_note(extra="- a video in `input/` (pick it in Load Video)\n"))
    model = _loader(g)
    positive = _prompt(g, EXTEND_PROMPT)
    vae = _vae(g)
    video = g.add("LoadVideo", file="input_video.mp4")
    parts = g.add("GetVideoComponents", video=video)
    frames = g.add("ImageScale", image=Link(parts.node, 0), upscale_method="lanczos", width=832, height=480,
                   crop="center")
    encoded = g.add("VAEEncode", pixels=frames, vae=vae)
    latent = g.add("SelfForcingExtendVideo", model=model, positive=positive, latent=encoded, extend_frames=80,
                   history_frames=3, resample_strength=0.3, **_sampling(), output="joined")
    images = g.add("VAEDecode", samples=latent, vae=vae)
    out = g.add("CreateVideo", images=images, fps=Link(parts.node, 2))
    g.add("SaveVideo", video=out, filename_prefix="video/self_forcing_extended", format="auto", codec="auto",
          **{"format.codec": "auto"})
    return g


def image_to_video() -> Graph:
    g = Graph("self_forcing_image_to_video",
              "Image to video: the image is VAE-encoded as a one-frame video and extended by 80 frames "
              "(81 in total).", note=files_note(extra="- an image in `input/` (pick it in Load Image)\n"))
    model = _loader(g)
    positive = _prompt(g, I2V_PROMPT)
    vae = _vae(g)
    image = g.add("LoadImage", image="example.png")
    scaled = g.add("ImageScale", image=Link(image.node, 0), upscale_method="lanczos", width=832, height=480,
                   crop="center")
    encoded = g.add("VAEEncode", pixels=scaled, vae=vae)
    latent = g.add("SelfForcingExtendVideo", model=model, positive=positive, latent=encoded, extend_frames=80,
                   history_frames=1, resample_strength=0.2, **_sampling(), output="joined")
    _save(g, latent, vae, "video/self_forcing_i2v")
    return g


def save_embeds() -> Graph:
    g = Graph("self_forcing_save_text_embeds",
              "Encode a prompt once with umT5 and save it (models/text_embeds), so later runs need not load "
              "the 11 GB text encoder.", note=files_note())
    positive = _prompt(g, PROMPT)
    g.add("SelfForcingSaveTextEmbeds", conditioning=positive, filename_prefix="fox_in_snow", folder="text_embeds")
    return g


def t2v_from_embeds() -> Graph:
    g = Graph("self_forcing_t2v_from_saved_embeds",
              "Text to video from saved text embeddings (no text encoder loaded): for batch jobs and low-VRAM "
              "GPUs. Create the embeddings with the save_text_embeds workflow first.",
              note=files_note(text_encoder=False, extra="- `models/text_embeds/fox_in_snow_00001.safetensors` "
                              "(made by the save_text_embeds workflow; no text encoder is loaded here)\n"))
    model = _loader(g)
    positive = g.add("SelfForcingLoadTextEmbeds", embeds_name="fox_in_snow_00001.safetensors")
    vae = _vae(g)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=81,
                   **_sampling())
    _save(g, latent, vae, "video/self_forcing_t2v_embeds")
    return g


def toy_demo() -> Graph:
    """The bundled toy model, as ``self-forcing generate`` runs it: its metadata's sampling settings (3 frames
    per block, steps 1000/750/500/250 warped with shift 5, clean context) and, past the 12-frame training clip,
    a rolling cache of 12 latent frames without a sink; 8 fps."""
    g = Graph("self_forcing_toy_demo",
              "The toy demo: the small self-contained model that ships with the pack (a causal Wan DiT plus its own "
              "text encoder and codec) streams 45 frames of 64x64 shapes in 15 chunks through a rolling cache of "
              "12 frames. Runs on a CPU in seconds; nothing to download.",
              note="## Files this workflow needs\n- none: `assets/self_forcing_toy.safetensors` ships with the pack\n\n"
                   "Prompts may use only the toy vocabulary (the loader's info output lists it): shapes "
                   "(circle, square, triangle), colours and 'bouncing on a <colour> background'. With a toy "
                   "model every frame is one latent frame.\n")
    model = g.add("SelfForcingToyModelLoader", model_name=TOY_MODELS[0], device="default")
    positive = g.add("SelfForcingToyTextEncode", model=model, text=TOY_PROMPT)
    options = g.add("SelfForcingLongVideoOptions", cache="rolling", window=12, sink=0, routing_topk=0,
                    positions="absolute", kv_fp8=False)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=64, height=64, length=45,
                   **_sampling(seed=0), options=options)
    images = g.add("SelfForcingToyDecode", model=model, latent=latent)
    video = g.add("CreateVideo", images=images, fps=8.0)
    g.add("SaveVideo", video=video, filename_prefix="video/self_forcing_toy", format="auto", codec="auto",
          **{"format.codec": "auto"})
    return g


TOY_SWITCH_PROMPTS = ("a red circle and a yellow square bouncing on a navy background",
                      "a green triangle bouncing on a navy background",
                      "a magenta circle and a cyan triangle bouncing on a navy background")
MINUTE_PROMPTS = (PROMPT,
                  "The red fox stops at the edge of a frozen lake and looks around, snow starting to fall, soft grey "
                  "light, the camera tracking alongside at eye level, cinematic, detailed fur.",
                  "The red fox runs across the frozen lake in heavy snowfall at dusk, blue hour light, the camera "
                  "tracking alongside at eye level, cinematic, detailed fur.")


def toy_prompt_switch() -> Graph:
    """Prompt switching on the bundled toy model (runs on a CPU): three prompts, each switch re-caching the KV cache
    under the new prompt; a rolling window of 9 frames + a sink of 3 (sink + window = its 12-frame training clip)
    with rebased positions, 69 frames (about 8.6 s at 8 fps; sampler lengths are 4k+1)."""
    g = Graph("self_forcing_toy_prompt_switch",
              "Prompt switching mid-stream with the toy model (runs on a CPU in seconds): the video starts with the "
              "first prompt, switches at frame 24 and at frame 48 (Self Forcing Prompt Schedule, chained), each switch "
              "re-caching the KV cache under the new prompt, while the chunks keep streaming. Rolling window 9 + sink 3 "
              "with rebased positions: 69 frames, about 8.6 s at 8 fps.",
              note="## Files this workflow needs\n- none: `assets/self_forcing_toy.safetensors` ships with the pack\n\n"
                   "Each Prompt Schedule node adds one switch: 'previous' is the prompt (or schedule) before it, "
                   "'conditioning' the prompt from 'start_frame' on. 'switch': recache (recompute the cached frames "
                   "under the new prompt), keep (old keys/values stay) or reset (a new shot). Toy prompts use only the "
                   "toy vocabulary.\n")
    model = g.add("SelfForcingToyModelLoader", model_name=TOY_MODELS[0], device="default")
    prompts = [g.add("SelfForcingToyTextEncode", f"Prompt {i + 1}", model=model, text=text)
               for i, text in enumerate(TOY_SWITCH_PROMPTS)]
    first = g.add("SelfForcingPromptSchedule", "Switch at frame 24", previous=prompts[0], conditioning=prompts[1],
                  start_frame=24, switch="recache")
    second = g.add("SelfForcingPromptSchedule", "Switch at frame 48", previous=first, conditioning=prompts[2],
                   start_frame=48, switch="recache")
    options = g.add("SelfForcingLongVideoOptions", cache="rolling", window=9, sink=3, routing_topk=0,
                    positions="rebased", kv_fp8=False)
    latent = g.add("SelfForcingSampler", model=model, positive=second, width=64, height=64, length=69,
                   **_sampling(seed=0), options=options)
    images = g.add("SelfForcingToyDecode", model=model, latent=latent)
    video = g.add("CreateVideo", images=images, fps=8.0)
    g.add("SaveVideo", video=video, filename_prefix="video/self_forcing_toy_switch", format="auto", codec="auto",
          **{"format.codec": "auto"})
    return g


def long_video_minute() -> Graph:
    """A minute of Wan video (961 frames = 241 latent frames) through a rolling cache whose sink + window is the
    official 21-frame training length (window 18 + sink 3 = local_attn_size 21), with rebased positions so no
    distance the model sees exceeds it, and two prompt switches (KV re-cache)."""
    g = Graph("self_forcing_long_video_rolling_60s",
              "A minute-long video (961 frames, 60 s at 16 fps) with a rolling KV cache: window 18 + sink 3 latent "
              "frames (the official local_attn_size 21, the training length; our window does not count the sink) "
              "and rebased positions, so the model never sees a distance longer than it was trained on, whatever "
              "the length. The prompt switches at 20 s and 40 s (KV re-cache). Memory and time per chunk stay flat.",
              note=files_note())
    model = _loader(g)
    clip = g.add("CLIPLoader", clip_name=weights.UMT5.name, type="wan", device="default")
    prompts = [g.add("CLIPTextEncode", f"Prompt {i + 1}", text=text, clip=clip) for i, text in enumerate(MINUTE_PROMPTS)]
    vae = _vae(g)
    first = g.add("SelfForcingPromptSchedule", "Switch at 20 s", previous=prompts[0], conditioning=prompts[1],
                  start_frame=320, switch="recache")
    second = g.add("SelfForcingPromptSchedule", "Switch at 40 s", previous=first, conditioning=prompts[2],
                   start_frame=640, switch="recache")
    options = g.add("SelfForcingLongVideoOptions", cache="rolling", window=18, sink=3, routing_topk=0,
                    positions="rebased", kv_fp8=False)
    latent = g.add("SelfForcingSampler", model=model, positive=second, width=832, height=480, length=961,
                   **_sampling(), options=options)
    _save(g, latent, vae, "video/self_forcing_minute")
    return g


# -- core MODEL workflows: core loaders (UNETLoader, LoraLoaderModelOnly) into our sampler -------------------
CORE_LORA = "my_self_forcing_lora.safetensors"
KREA_14B = "krea-realtime-video-14b.safetensors"
EMBEDS = "fox_in_snow_00001.safetensors"
EMBEDS_NOTE = (f"- `models/text_embeds/{EMBEDS}`: the prompt, encoded once by the *self_forcing_save_text_embeds* "
               "workflow (so no text encoder is loaded here). To type prompts instead, replace 'Load Text "
               "Embeddings' with core Load CLIP (type wan) + CLIP Text Encode: the sampler's *positive* takes either.\n")


def core_lora() -> Graph:
    g = Graph("self_forcing_core_lora",
              "Core loader + LoRA: ComfyUI's own Load Diffusion Model (UNETLoader) and LoraLoaderModelOnly feed the "
              "Self Forcing Stream Sampler a core MODEL; ComfyUI loads, patches and manages the weights. 81 frames "
              "at 832x480.",
              note=(f"## Files this workflow needs\n"
                    f"- `models/diffusion_models/{weights.SELF_FORCING.name}`: Self Forcing in Wan/ComfyUI key names "
                    f"(`self-forcing download` writes it); any causal Wan 2.1 checkpoint core UNETLoader reads works "
                    f"(for a `.pt` training checkpoint, e.g. `rolling_forcing_dmd.pt`, use 'Load Self Forcing Model "
                    f"(core MODEL)' instead of UNETLoader)\n"
                    f"- `models/loras/{CORE_LORA}`: a LoRA for that model in ComfyUI's key format "
                    "(`diffusion_model.blocks.N.<linear>.lora_down/lora_up/alpha`, what `self-forcing train` with a "
                    "LoRA section writes); chain more LoraLoaderModelOnly nodes for more LoRAs\n"
                    f"- `models/vae/{weights.WAN_VAE.name}` ([download]({weights.WAN_VAE.url}))\n" + EMBEDS_NOTE +
                    "\nUNETLoader carries no Self Forcing metadata: set *frames_per_block* and *steps* on the sampler "
                    "to the model's (3 and 1000,750,500,250 for Self Forcing).\n"))
    model = g.add("UNETLoader", unet_name=weights.SELF_FORCING.name, weight_dtype="default")
    model = g.add("LoraLoaderModelOnly", model=model, lora_name=CORE_LORA, strength_model=1.0)
    positive = g.add("SelfForcingLoadTextEmbeds", embeds_name=EMBEDS)
    vae = _vae(g)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=81,
                   **_sampling())
    _save(g, latent, vae, "video/self_forcing_core_lora")
    return g


def low_memory_14b() -> Graph:
    g = Graph("self_forcing_14b_low_memory",
              "A 14B causal Wan (Krea Realtime 14B, distilled from Wan 2.1 14B with Self Forcing) at 832x480 with "
              "the least memory: fp8 weights through core UNETLoader, no text encoder loaded (saved embeddings), "
              "ComfyUI's model management on the core MODEL.",
              note=(f"## Files this workflow needs\n"
                    f"- `models/diffusion_models/{KREA_14B}` (huggingface.co/krea/krea-realtime-video, 28 GB bf16): "
                    "read as it is published (`model.` key prefix); any Wan 2.1 14B causal checkpoint in Wan/ComfyUI "
                    "names works the same\n"
                    f"- `models/vae/{weights.WAN_VAE.name}` ([download]({weights.WAN_VAE.url}))\n" + EMBEDS_NOTE +
                    "\n## Memory\n"
                    "- *weight_dtype* fp8_e4m3fn: ComfyUI keeps the 14B weights in fp8 (about 14 GB instead of 28 GB "
                    "in bf16); the saved embeddings spare the 11 GB umT5-XXL text encoder.\n"
                    "- The sampler keeps these fp8 weights as they are and casts them to bf16 one layer at a time "
                    "as each layer runs (a scaled-fp8 file's scales applied then), so sampling adds no bf16 copy "
                    "of the model: the GPU needs room for the fp8 weights, one layer in bf16, the KV cache and the "
                    "activations; a smaller *length* or size lowers the last two.\n"
                    "- Krea trained with 3 frames per block and Self Forcing's step list (the sampler's defaults "
                    "here); its demo server's KV re-computation is not reproduced.\n"))
    model = g.add("UNETLoader", unet_name=KREA_14B, weight_dtype="fp8_e4m3fn")
    positive = g.add("SelfForcingLoadTextEmbeds", embeds_name=EMBEDS)
    vae = _vae(g)
    latent = g.add("SelfForcingSampler", model=model, positive=positive, width=832, height=480, length=81,
                   **_sampling())
    _save(g, latent, vae, "video/self_forcing_14b")
    return g


WORKFLOWS = (t2v_stream, t2v_stream_decode, long_video, extend, image_to_video, save_embeds, t2v_from_embeds,
             toy_demo, toy_prompt_switch, long_video_minute, core_lora, low_memory_14b)


# -- writers ---------------------------------------------------------------------------------------
def to_api(g: Graph, schemas: dict) -> dict:
    out = {}
    for n in g.nodes:
        inputs = {k: ([str(v.node), v.slot] if isinstance(v, Link) else v) for k, v in n.inputs.items()}
        title = n.title or schemas[n.type].get("display_name") or n.type
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": title}}
    return out


def _depths(g: Graph) -> dict[int, int]:
    depth: dict[int, int] = {}
    for n in g.nodes:  # nodes are added after their sources
        srcs = [v.node for v in n.inputs.values() if isinstance(v, Link)]
        depth[n.id] = 1 + max((depth[s] for s in srcs), default=-1)
    return depth


def to_ui(g: Graph, schemas: dict) -> dict:
    """The editor's JSON (litegraph, version 0.4) for a graph, widgets in /object_info order."""
    depth = _depths(g)
    rows: dict[int, int] = {}
    links, ui_nodes = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for n in g.nodes:
        for name, v in n.inputs.items():
            if isinstance(v, Link):
                links.append([len(links) + 1, v.node, v.slot, n.id, name, None])
                outputs_links.setdefault((v.node, v.slot), []).append(len(links))
    link_of = {(l[3], l[4]): l for l in links}
    note_id = len(g.nodes) + 1
    for order, n in enumerate(sorted(g.nodes, key=lambda n: (depth[n.id], n.id))):
        schema = schemas[n.type]
        d = depth[n.id]
        row = rows.get(d, 0)
        rows[d] = row + 1
        ins = []
        for name, spec, section in ordered_inputs(schema):
            link = link_of.get((n.id, name))
            is_socket = not (spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or isinstance(spec[0], list))
            if not is_socket and link is None:
                continue
            entry = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": None}
            if not is_socket:
                entry["widget"] = {"name": name}
            if link is not None:
                link[4] = len(ins)
                link[5] = entry["type"]
                entry["type"] = _socket_type(entry["type"], g, link, schemas)
                entry["link"] = link[0]
            ins.append(entry)
        outs = [{"name": name, "type": t, "slot_index": i, "links": outputs_links.get((n.id, i), [])}
                for i, (t, name) in enumerate(zip(schema["output"], schema.get("output_name") or schema["output"]))]
        values = []
        for name, count in widget_slots(schema):
            if name is None:  # upload button
                values.extend(["image"] * count)
                continue
            v = n.inputs.get(name)
            values.append(v if not isinstance(v, Link) else _default(schema, name))
            if count > 1:
                values.append("fixed")
        ours = n.type.startswith("SelfForcing")
        node = {
            "id": n.id, "type": n.type, "pos": [40 + 420 * d, 40 + 330 * row], "size": [380, 290],
            "flags": {}, "order": order, "mode": 0, "inputs": ins, "outputs": outs,
            "properties": {"cnr_id": PACK_ID if ours else "comfy-core",
                           "ver": PACK_VERSION if ours else CORE_VERSION, "Node name for S&R": n.type},
            "widgets_values": values,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    for link in links:  # origin slots are output indices already; the type is the output's
        src = next(x for x in g.nodes if x.id == link[1])
        link[5] = schemas[src.type]["output"][link[2]]
    if g.note:
        ui_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [40, -260], "size": [560, 230], "flags": {},
                         "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                         "properties": {}, "widgets_values": [f"# {g.description}\n\n{g.note}"],
                         "color": "#432", "bgcolor": "#653", "title": "Read me"})
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{PACK_ID}/{g.name}")), "revision": 0,
        "last_node_id": note_id if g.note else len(g.nodes), "last_link_id": len(links),
        "nodes": ui_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [40, 300]},
                  "node_versions": {"comfy-core": CORE_VERSION, PACK_ID: PACK_VERSION}},
        "version": 0.4,
    }


def _socket_type(accepted: str, g: Graph, link: list, schemas: dict) -> str:
    """A linked socket's type in the editor's JSON: the input's type, except on an input of several types
    ('SELF_FORCING_MODEL,MODEL'), which takes the type of what is linked (a core MODEL from UNETLoader: 'MODEL';
    our loader's output keeps today's 'SELF_FORCING_MODEL', so the files saved before the union are unchanged)."""
    if "," not in accepted:
        return accepted
    src = next(x for x in g.nodes if x.id == link[1])
    out = schemas[src.type]["output"][link[2]]
    return out if out in {t.strip() for t in accepted.split(",")} else accepted


def _default(schema: dict, name: str):
    for n, spec, _ in ordered_inputs(schema):
        if n == name:
            return (spec[1] if len(spec) > 1 else {}).get("default")
    return None


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render_all(schemas: dict | None = None) -> dict[Path, str]:
    schemas = schemas or all_schemas()
    files = {}
    for make in WORKFLOWS:
        g = make()
        files[API_DIR / f"{g.name}.json"] = _dump(to_api(g, schemas))
        files[UI_DIR / f"{g.name}.json"] = _dump(to_ui(g, schemas))
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if a file is missing or differs")
    args = ap.parse_args(argv)
    stale = []
    for path, text in render_all().items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for p in stale:
        print(("stale: " if args.check else "wrote: ") + str(p.relative_to(REPO)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())

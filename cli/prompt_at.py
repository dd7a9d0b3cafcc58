"""``--prompt-at FRAME:[POLICY:]PROMPT``: the prompt switches of ``self-forcing generate`` as a prompt schedule."""

from __future__ import annotations

from typing import Callable

from ..sf_model.prompt_schedule import DEFAULT_SWITCH, SWITCH_POLICIES


def parse_prompt_at(values, default: str = DEFAULT_SWITCH) -> list[tuple[int, str, str]]:
    """(latent frame, policy, prompt) of every ``--prompt-at FRAME:[POLICY:]PROMPT``, by frame."""
    out = []
    for value in values or ():
        head, sep, rest = str(value).partition(":")
        if not sep or not rest.strip():
            raise ValueError(f"--prompt-at {value!r}: expected FRAME:PROMPT or FRAME:POLICY:PROMPT, e.g. "
                             "'24:a green triangle bouncing on a navy background' or '24:reset:prompt.safetensors'")
        try:
            frame = int(head)
        except ValueError:
            raise ValueError(f"--prompt-at {value!r}: {head!r} is not a latent frame number") from None
        if frame < 1:
            raise ValueError(f"--prompt-at {value!r}: the frame must be >= 1 (frame 0 is --prompt / --embeds)")
        policy, sep, prompt = rest.partition(":")
        if not sep or policy not in SWITCH_POLICIES:
            policy, prompt = default, rest
        if not prompt.strip():
            raise ValueError(f"--prompt-at {value!r}: the prompt is empty")
        out.append((frame, policy, prompt))
    frames = sorted(f for f, _, _ in out)
    if len(set(frames)) != len(frames):
        raise ValueError(f"--prompt-at: two prompts start at the same frame ({frames})")
    return sorted(out)


def prompt_plan(args, first, num_frames: int, encode: Callable):
    """``first`` (a context) alone, or a ``PromptSchedule`` with the ``--prompt-at`` switches (``encode(prompt)``
    -> context); switches past the video are refused."""
    from ..sf_model.prompt_schedule import PromptSchedule

    switches = parse_prompt_at(getattr(args, "prompt_at", None), getattr(args, "switch", DEFAULT_SWITCH))
    if not switches:
        return first
    late = [f for f, _, _ in switches if f >= num_frames]
    if late:
        raise ValueError(f"--prompt-at frame {late[0]} is past the video's last latent frame {num_frames - 1}")
    return PromptSchedule.of(first, [(f, encode(prompt), policy) for f, policy, prompt in switches])


def _prompts_note(prompts) -> str:
    from ..sf_model.prompt_schedule import PromptSchedule

    return f", prompts at {prompts.describe()}" if isinstance(prompts, PromptSchedule) else ""

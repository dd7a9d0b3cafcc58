"""Self Forcing streaming video generation: ComfyUI custom-node pack and Python package.

In ComfyUI this folder is imported as a custom-node module and ComfyUI calls
``comfy_entrypoint`` (V3 API). As an installed package (``import self_forcing``) nothing
ComfyUI-specific is imported: ``sf_model``, ``training`` and the CLI work on their own.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI awaits this to get the extension with our node list."""
    from .nodes.comfy import SelfForcingExtension

    return SelfForcingExtension()

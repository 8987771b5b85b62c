"""lowtide's ComfyUI nodes: link or copy this folder to ``ComfyUI/custom_nodes/lowtide`` after
``pip install`` of the ``lowtide`` package into ComfyUI's Python (docs/comfyui.md)."""

from lowtide.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

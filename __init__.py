"""ComfyUI-MAGI1-MotionDetailCache: MAGI-1 video generation in ComfyUI, accelerated by MotionDetailCache.

Inside ComfyUI this registers the pack's nodes through the V3 API (``comfy_entrypoint``). Imported
anywhere else (tests, scripts) it does nothing, so ``cache_core`` and ``magi1`` stay usable on their own.
"""

WEB_DIRECTORY = "./web"  # served by ComfyUI: web/docs/<node id>.md is each node's help page

try:
    from comfy_api.latest import ComfyExtension
except ModuleNotFoundError as error:  # not running inside ComfyUI
    if error.name not in ("comfy_api", "comfy_api.latest"):
        raise
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES, report_problems_per_input

    class MAGI1Extension(ComfyExtension):
        async def get_node_list(self):
            report_problems_per_input()  # nodes/queue_checks.py: each queue-time problem on its own input
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return MAGI1Extension()

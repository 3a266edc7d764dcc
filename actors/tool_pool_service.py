"""ToolPoolService: one shared pool per tool kind, as a Ray actor every generator can call.

`ToolPool` (actors/tool_pool.py) owns the worker actors, back-pressure,
timeouts, restarts and metrics; this thin async actor makes one pool reachable
from all generation actors (`await pool.call.remote(code)`), and lets a user
resize it at run time (`ray.get(pool.scale.remote(8))`).
"""

from __future__ import annotations

import asyncio
from typing import Any


class ToolPoolService:
    def __init__(self, tool: str, *, tools_cfg: Any, resources: Any, placement_group: Any = None,
                 bundle_indices: Any = None, **settings_overrides: Any):
        from actors.tool_pool import ToolPool

        self.tool = tool
        self.pool = ToolPool.from_config(tool, tools_cfg, resources, placement_group=placement_group,
                                         bundle_indices=bundle_indices, **settings_overrides)

    def ready(self) -> dict[str, Any]:
        return {"tool": self.tool, "workers": len(self.pool.worker_handles())}

    async def call(self, argument: str, timeout_s: float | None = None) -> Any:
        return await self.pool.call(argument, timeout_s=timeout_s)

    async def scale(self, workers: int) -> int:
        return await asyncio.to_thread(self.pool.scale, workers)

    async def metrics(self) -> dict[str, float]:
        return await asyncio.to_thread(self.pool.metrics)

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.pool.close)

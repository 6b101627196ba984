"""GPU-only checks of the forward: free of host syncs with a fixed capacity, and capturable in a
CUDA graph. On the CPU both say they were skipped."""

from __future__ import annotations

import torch
from torch import Tensor

from expert_parallel import MoELayer


def sync_free_forward(layer: MoELayer, x: Tensor) -> dict:
    """Run the forward under ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises."""
    if x.device.type != "cuda":
        return {"ok": None, "note": "skipped: needs CUDA"}
    if layer.cfg.capacity is None:
        return {"ok": None, "note": "skipped: the capacity is agreed per batch (one host sync by design)"}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            layer(x)
        return {"ok": True, "note": "no host sync in the forward"}
    except RuntimeError as error:
        return {"ok": False, "note": f"host sync: {str(error).splitlines()[0]}"}
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_capturable_forward(layer: MoELayer, x: Tensor) -> dict:
    """Capture one forward in a ``torch.cuda.CUDAGraph``, replay it and compare with eager."""
    if x.device.type != "cuda":
        return {"ok": None, "note": "skipped: needs CUDA"}
    static_x = x.detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):  # warm up on the side stream, as CUDA graphs require
                layer(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            captured = layer(static_x).output
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = layer(static_x).output
        same = torch.allclose(captured, eager)
        return {"ok": bool(same), "note": "captured and replayed" + ("" if same else "; replay differs")}
    except RuntimeError as error:
        return {"ok": False, "note": f"capture failed: {str(error).splitlines()[0]}"}

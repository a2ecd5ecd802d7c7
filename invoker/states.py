"""Model states as workers report them (the memory issue's COLD -> HOST -> WARM -> HOT ladder)."""

from __future__ import annotations

COLD, HOST, WARM, HOT = "COLD", "HOST", "WARM", "HOT"
# A worker reads a function's invocation stream only when the model is at least WARM: the step to HOT is a
# remap of KV pages, cheap enough to do on the first request.
SERVABLE = (WARM, HOT)
# Control actions the warmer (or the router) sends as RQ jobs, and the state each one leaves the model in.
ACTIONS = {"load_host": HOST, "prewarm": WARM, "activate": HOT, "deactivate": WARM, "evict": HOST}

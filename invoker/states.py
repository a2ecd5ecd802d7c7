"""Model states as workers report them (the memory issue's COLD -> HOST -> WARM -> HOT ladder)."""

from __future__ import annotations

COLD, HOST, WARM, HOT = "COLD", "HOST", "WARM", "HOT"
# Reported while a control action is moving the model; the warmer counts it as a copy on its way.
LOADING = "LOADING"
# A worker reads a function's invocation stream only when the model is at least WARM: the step to HOT is a
# remap of KV pages, cheap enough to do on the first request.
SERVABLE = (WARM, HOT)
# Control actions the warmer (or the router) sends as RQ jobs.
ACTIONS = ("load_host", "prewarm", "activate", "deactivate", "evict")

"""One reading of a model directory: its shape, real maximum length and byte costs in a serving dtype.

Spec validation, the warmer, the worker's memory pool and the simulator all size models through this package,
so they agree with each other and with what the worker reserves. No torch here: the gateway and the warmer use it.
"""

from modelinfo.config import (
    DTYPE_BYTES,
    ModelConfig,
    ModelFileError,
    config_from_dict,
    dtype_bytes,
    load_model_config,
)

__all__ = ["DTYPE_BYTES", "ModelConfig", "ModelFileError", "config_from_dict", "dtype_bytes", "load_model_config"]

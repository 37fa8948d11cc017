"""The one place that imports NVIDIA FLARE: every other module of this package imports it from here.

A missing or broken installation becomes one EngineError with the install hint.
"""

from __future__ import annotations

from fedumm.errors import EngineError

INSTALL_HINT = "pip install 'fedumm[nvflare]'"

try:
    import nvflare
    import nvflare.client as flare_client
    from nvflare.apis.utils.decomposers import flare_decomposers
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.app_common.workflows.model_controller import ModelController
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.client.config import ExchangeFormat, TransferType
    from nvflare.fuel.flare_api.flare_api import new_secure_session
    from nvflare.fuel.utils import fobs, log_utils
    from nvflare.fuel.utils.constants import FrameworkType
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import ScriptRunner
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise EngineError(
        f"the nvflare engines need NVIDIA FLARE ({exc}); install it with {INSTALL_HINT}"
    ) from None

NVFLARE_VERSION: str = getattr(nvflare, "__version__", "unknown")

__all__ = [
    "INSTALL_HINT",
    "NVFLARE_VERSION",
    "ExchangeFormat",
    "FLModel",
    "FLModelUtils",
    "FedJob",
    "FrameworkType",
    "ModelController",
    "ParamsType",
    "ScriptRunner",
    "TensorDecomposer",
    "TransferType",
    "flare_client",
    "fobs",
    "log_utils",
    "new_secure_session",
    "register_tensor_decomposer",
    "fobs_nbytes",
]


def register_tensor_decomposer() -> None:
    """FOBS as a FLARE process has it (Shareable, DXO, ... decomposers) plus torch tensors as
    safetensors (FLARE registers that one on clients, not on the server)."""
    flare_decomposers.register()
    common_decomposers.register()
    fobs.register(TensorDecomposer)


def fobs_nbytes(model: FLModel) -> int:
    """Bytes of the FOBS serialisation of ``model`` as FLARE ships it: the Shareable (DXO) that
    ``FLModelUtils.to_shareable`` builds, tensors encoded natively (safetensors per tensor)."""
    register_tensor_decomposer()
    return len(fobs.dumps(FLModelUtils.to_shareable(model)))

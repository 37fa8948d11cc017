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
    "he_filters",
    "register_he_decomposers",
    "he_meta_keys",
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


def he_filters(context_file: str):
    """FLARE's HE filters for a client (encrypt results, decrypt task data) and the filter types.

    Imported on demand: they need TenSEAL (``pip install 'fedumm[nvflare]'``).
    """
    try:
        from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
        from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
        from nvflare.job_config.defs import FilterType
    except ImportError as exc:  # pragma: no cover - exercised only without tenseal
        raise EngineError(
            f"secure aggregation needs TenSEAL ({exc}); install it with {INSTALL_HINT}"
        ) from None
    # weights are applied by the server (bounded example counts), not by the client before encryption
    encryptor = HEModelEncryptor(tenseal_context_file=context_file, weigh_by_local_iter=False)
    decryptor = HEModelDecryptor(tenseal_context_file=context_file)
    return encryptor, decryptor, FilterType


def register_he_decomposers() -> None:
    """FOBS support for CKKS vectors (FLARE's own decomposer)."""
    from nvflare.app_opt.he import decomposers

    decomposers.register()


def he_meta_keys() -> tuple[str, str, str]:
    """The DXO meta keys FLARE's HE filters read: processed keys, algorithm, and CKKS's name."""
    from nvflare.apis.dxo import MetaKey
    from nvflare.app_opt.he.constant import HE_ALGORITHM_CKKS

    return MetaKey.PROCESSED_KEYS, MetaKey.PROCESSED_ALGORITHM, HE_ALGORITHM_CKKS

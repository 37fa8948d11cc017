"""Client side of the FLARE job (Client API): the same local training as every other engine.

Run through the thin script ``fedumm_client.py`` that the job ships in ``custom/``. Per received
global adapter it calls :func:`fedumm.client.train.run_client_round` and sends back the full adapter
state with ``num_examples`` (and ``group_examples``) in the meta and the local metrics.

Per-site settings (a site's data and backbone live on that site) come from the environment of the
FLARE client process, applied on top of the config shipped in the job:

- ``FEDUMM_DATA_PATH``: this site's dataset directory (``data.path``)
- ``FEDUMM_MODEL_PATH``: this site's local copy of the backbone checkpoint (``model.path``)
- ``FEDUMM_SITE_OVERRIDES``: a file of ``key=value`` lines, the same syntax as ``--set``
  (e.g. ``model.device=cuda``); blank lines and ``#`` comments are ignored
- ``FEDUMM_TORCH_THREADS``: torch threads of this site's training (fedumm's simulator and local
  POC runs set it, with OMP/MKL_NUM_THREADS, to the machine's cores divided by its sites)
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedumm.config import Config, load_config
from fedumm.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "main",
    "Reply",
    "SiteRounds",
    "site_overrides",
    "load_site_config",
    "ENV_DATA_PATH",
    "ENV_MODEL_PATH",
    "ENV_SITE_OVERRIDES",
    "ENV_TORCH_THREADS",
]

ENV_DATA_PATH = "FEDUMM_DATA_PATH"
ENV_MODEL_PATH = "FEDUMM_MODEL_PATH"
ENV_SITE_OVERRIDES = "FEDUMM_SITE_OVERRIDES"
ENV_TORCH_THREADS = "FEDUMM_TORCH_THREADS"  # torch threads of this site's trainer (set by fedumm's runners)


def site_overrides(environ: os._Environ | dict | None = None) -> list[str]:
    """The ``--set``-style overrides this site's environment asks for."""
    env = os.environ if environ is None else environ
    out: list[str] = []
    if env.get(ENV_DATA_PATH):
        out.append(f"data.path={env[ENV_DATA_PATH]}")
    if env.get(ENV_MODEL_PATH):
        out.append(f"model.path={env[ENV_MODEL_PATH]}")
    if env.get(ENV_SITE_OVERRIDES):
        p = Path(env[ENV_SITE_OVERRIDES])
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"{ENV_SITE_OVERRIDES}={p}: cannot read ({exc})") from None
        out.extend(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    return out


def load_site_config(config_path: str | Path, environ: os._Environ | dict | None = None) -> Config:
    """The shipped config with this site's overrides applied."""
    return load_config(config_path, site_overrides(environ))


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else base / p)


def he_global(received, initial):
    """The global adapter from a secure-aggregation broadcast: W_0 itself in round 1, afterwards
    W_0 + D_t with D_t as FLARE's HEModelDecryptor decrypted it (flat values per key)."""
    import numpy as np
    import torch

    from fedumm.engines.nvflare.names import HE_META

    kind = (received.meta or {}).get(HE_META)
    out = {}
    for k, ref in initial.items():
        values = torch.as_tensor(np.asarray(received.params[k], dtype=np.float64)).reshape(ref.shape)
        out[k] = (values if kind == "init" else ref.double() + values).to(ref.dtype)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="fedumm FLARE client (Client API)")
    ap.add_argument("--config", required=True, help="resolved fedumm config (relative: beside the script)")
    ap.add_argument("--partition", default=None, help="partition.json (simulation/POC only)")
    return ap.parse_args(list(argv) if argv is not None else None)


@dataclass(frozen=True)
class Reply:
    """What a site sends back for one task: FLARE's params type ("FULL" or "DIFF"), its params
    (torch tensors; numpy arrays under HE), meta and metrics."""

    params_type: str
    params: dict
    meta: dict
    metrics: dict


class SiteRounds:
    """One round of a site, from the received broadcast to the reply: the same for a site process
    with its own backbone and for the shared trainer that holds one backbone for many sites.

    Keeps what lives between rounds: the strategy's client-side hooks (FedProx's term, FFA-LoRA's
    frozen A), the error-feedback residuals of every site it serves, and under HE the LoRA
    initialisation W_0 every site shares.
    """

    def __init__(self, cfg: Config) -> None:
        from fedumm.fl.residuals import ResidualStore
        from fedumm.fl.strategies import make_strategy

        self.cfg = cfg
        fed = cfg.federation
        self.strategy = make_strategy(
            fed.strategy, group_strategies=fed.group_strategies, **fed.strategy_params
        )
        self.he = fed.secure_aggregation == "he"
        self.residuals = ResidualStore(dtype=fed.residual_dtype)
        self.initial = None  # W_0 under HE, from the first site's (shared) backbone before any training
        self.sites: dict = {}  # name -> Site
        self.errors: dict[str, str] = {}  # name -> why it cannot train

    def add(self, name: str, build) -> None:
        """Build site ``name`` with ``build()`` (a :class:`fedumm.client.site.Site`); a failure is kept
        and reported with every task, so the server log says why this site drops out."""
        try:
            site = build()
        except Exception as exc:
            log.exception("%s: cannot load the model or data", name)
            self.errors[name] = f"{name} cannot load its model or data: {type(exc).__name__}: {exc}"
            return
        if self.he and self.initial is None:
            from fedumm.models.lora_state import get_adapter_state

            self.initial = get_adapter_state(site.family.model)
        self.sites[name] = site

    def error_reply(self, message: str) -> Reply:
        from fedumm.engines.nvflare.names import ERROR_KEY

        return Reply("FULL", {}, {ERROR_KEY: message}, {})

    def round(self, name: str, rnd: int, params: dict, meta: dict) -> Reply:
        """Train site ``name`` for round ``rnd`` from the broadcast ``params``/``meta``; failures
        become an error reply (this round is lost for this site; the next one may work)."""
        if name in self.errors:
            return self.error_reply(self.errors[name])
        try:
            return self._round(name, rnd, params, meta)
        except Exception as exc:
            log.exception("%s: round %d failed", name, rnd)
            return self.error_reply(f"round {rnd}: {type(exc).__name__}: {exc}")

    def _round(self, name: str, rnd: int, params: dict, meta: dict) -> Reply:
        from types import SimpleNamespace

        from fedumm.client.adversary import run_site_round
        from fedumm.engines.nvflare.names import CODEC_META
        from fedumm.fl.compress import decode
        from fedumm.fl.residuals import compressed_delta

        site = self.sites[name]
        fed = self.cfg.federation
        if self.he:
            global_state = he_global(SimpleNamespace(params=params, meta=meta), self.initial)
        elif meta.get(CODEC_META, "none") != "none":  # a half-precision broadcast
            global_state = decode(params, meta[CODEC_META], sender="server")
        else:
            global_state = params
        update = run_site_round(
            site.family,
            adversary=site.adversary,
            client_id=name,
            global_state=global_state,
            data=site.data,
            spec=site.spec,
            base_seed=self.cfg.seed,
            rnd=rnd,
            proximal_mu=self.strategy.proximal_mu,
            frozen_suffixes=self.strategy.frozen_suffixes,
        )
        out_meta: dict = {"num_examples": update.num_examples}
        if update.group_examples is not None:
            out_meta["group_examples"] = {str(k): int(v) for k, v in update.group_examples.items()}
        if self.he:  # the delta, as numpy arrays: FLARE's HEModelEncryptor encrypts it on the way out
            params_type = "DIFF"
            out = {
                k: (update.state[k].detach().double() - global_state[k].detach().double()).numpy()
                for k in update.state
            }
        elif fed.compression != "none":  # the compressed delta, as the in-process engine sends it
            out = compressed_delta(
                update.state,
                global_state,
                fed.compression,
                client=name,
                rnd=rnd,
                residuals=self.residuals if fed.error_feedback else None,
            )
            params_type = "DIFF"
            out_meta[CODEC_META] = fed.compression
        else:
            params_type = "FULL"
            out = {k: v.detach().cpu().contiguous() for k, v in update.state.items()}
        log.info("%s: round %d trained (%d examples)", name, rnd, update.num_examples)
        return Reply(params_type, out, out_meta, {k: float(v) for k, v in update.metrics.items()})


def main(argv: Sequence[str] | None = None, *, script_dir: str | Path | None = None) -> None:
    """Client loop: receive the global adapter, train one round, send the update, until the job ends."""
    from fedumm.client.site import build_site
    from fedumm.engines.nvflare._flare import FLModel, ParamsType, flare_client

    args = parse_args(argv)
    threads = os.environ.get(ENV_TORCH_THREADS)
    if threads:  # the run shares this machine's cores out between its sites
        import torch

        torch.set_num_threads(max(1, int(threads)))
    base = Path(script_dir) if script_dir else Path.cwd()
    flare_client.init()
    site = flare_client.get_site_name()
    cfg = load_site_config(_resolve(args.config, base))
    partition = _resolve(args.partition, base) if args.partition else None
    rounds = SiteRounds(cfg)
    rounds.add(site, lambda: build_site(cfg, site, partition_path=partition))
    log.info("%s: ready", site)
    while flare_client.is_running():
        received = flare_client.receive()
        if received is None:
            break
        rnd = int(received.current_round)
        reply = rounds.round(site, rnd, received.params or {}, dict(received.meta or {}))
        flare_client.send(
            FLModel(
                params_type=ParamsType.DIFF if reply.params_type == "DIFF" else ParamsType.FULL,
                params=reply.params,
                meta=reply.meta,
                metrics=reply.metrics,
                current_round=rnd,
            )
        )

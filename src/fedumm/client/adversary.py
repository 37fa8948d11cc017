"""Simulated malicious clients: a wrapper around a site's honest round, the same in every engine.

An :class:`Adversary` changes what a site trains on (``label_flip``, ``backdoor``) and what it sends
(``sign_flip``, ``scale``, ``gaussian``, ``free_rider``; any kind may also lie about its example
count with ``claimed_examples``). Engines call :func:`run_site_round` for every site; an honest
site (``adversary is None``) runs :func:`fedumm.client.train.run_client_round` unchanged.

The backdoor (Gu et al. 2017, "BadNets", arXiv:1708.06733) stamps a small black-and-white patch in
the bottom-right corner of copies of its images, written under the run directory (the dataset is
never modified), and trains those copies to answer ``target_answer``. With ``strength`` other than 1 a
``label_flip`` or ``backdoor`` client boosts its trained delta by that factor before sending it: the
"model replacement" of Bagdasaryan et al. 2020 ("How to backdoor federated learning",
arXiv:1807.00459), where a boost of about K / (attackers) lets one client's model outweigh the mean.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from fedumm.client.train import ClientData, run_client_round
from fedumm.config import AdversaryConfig, Config, client_names_of
from fedumm.data.vqa import canonical_answer
from fedumm.io import atomic_write_bytes
from fedumm.seeding import derive_seed
from fedumm.types import AdapterState, ClientUpdate

__all__ = [
    "Adversary",
    "adversary_of",
    "arm",
    "attack_data",
    "backdoor_test_set",
    "run_site_round",
    "trigger_image",
    "triggered_samples",
    "wrong_answer",
]

TRIGGER_DIR = "adversary"


@dataclass(frozen=True, kw_only=True)
class Adversary:
    """What one malicious client does (from ``adversary:`` in the config)."""

    kind: str
    strength: float = 1.0
    claimed_examples: int | None = None
    target_answer: str = "purple"
    trigger_size: int = 8
    poison_fraction: float = 0.5

    @classmethod
    def from_config(cls, a: AdversaryConfig) -> Adversary:
        return cls(
            kind=a.kind,
            strength=a.strength,
            claimed_examples=a.claimed_examples,
            target_answer=a.target_answer,
            trigger_size=a.trigger_size,
            poison_fraction=a.poison_fraction,
        )

    def tamper(self, update: ClientUpdate, global_state: AdapterState, *, seed: int) -> ClientUpdate:
        """The update this client sends instead of its honest one."""
        state = dict(update.state)
        if self.kind in ("sign_flip", "scale", "gaussian", "free_rider"):
            state = _tampered_state(self.kind, self.strength, update.state, global_state, seed)
        elif self.strength != 1.0:  # label_flip, backdoor: the trained delta boosted (model replacement)
            state = _tampered_state("scale", self.strength, update.state, global_state, seed)
        n = update.num_examples
        groups = update.group_examples
        if self.claimed_examples is not None:
            n = self.claimed_examples
            groups = {g: (n if v > 0 else 0) for g, v in (groups or {}).items()} or None
        return replace(update, state=state, num_examples=n, group_examples=groups)


def _tampered_state(
    kind: str, strength: float, state: AdapterState, global_state: AdapterState, seed: int
) -> dict[str, torch.Tensor]:
    if kind == "free_rider":
        return {k: v.detach().clone() for k, v in global_state.items()}
    delta = {k: state[k].detach().double() - global_state[k].detach().double() for k in global_state}
    if kind == "sign_flip":
        new = {k: -d for k, d in delta.items()}
    elif kind == "scale":
        new = {k: strength * d for k, d in delta.items()}
    else:  # gaussian: a random direction with the honest delta's norm times strength
        gen = torch.Generator().manual_seed(seed)
        # only over what the client trained (a frozen factor's delta is zero and stays zero)
        noise = {
            k: torch.randn(d.shape, generator=gen, dtype=torch.float64) if bool(d.any()) else d
            for k, d in sorted(delta.items())
        }
        honest = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
        length = math.sqrt(sum(float(n.pow(2).sum()) for n in noise.values())) or 1.0
        new = {k: n * (strength * honest / length) for k, n in noise.items()}
    # a frozen factor (FFA-LoRA's A) has a zero delta and stays exactly the global one
    return {
        k: global_state[k].detach().clone()
        if not bool(delta[k].any())
        else (global_state[k].detach().double() + new[k]).to(global_state[k].dtype)
        for k in sorted(global_state)
    }


def adversary_of(cfg: Config, name: str) -> Adversary | None:
    """The adversary site ``name`` plays in this run, or None for an honest site."""
    if cfg.adversary is None or name not in cfg.adversary.chosen(
        client_names_of(cfg.federation.clients), cfg.seed
    ):
        return None
    return Adversary.from_config(cfg.adversary)


def wrong_answer(answer: str, pool: Sequence[str]) -> str:
    """A deterministic wrong answer: the next canonical answer of the sorted pool (yes <-> no)."""
    a = canonical_answer(answer)
    if a in ("yes", "no"):
        return "no" if a == "yes" else "yes"
    options = sorted({canonical_answer(p) for p in pool} - {"yes", "no"})
    if a not in options:
        options = sorted([*options, a])
    if len(options) < 2:
        return a + " not"  # a one-answer pool: anything else is wrong
    return options[(options.index(a) + 1) % len(options)]


def trigger_image(src: Path, dst: Path, size: int) -> Path:
    """A copy of ``src`` with a ``size``-px checkerboard patch in its bottom-right corner (atomic)."""
    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    px = img.load()
    for y in range(max(0, h - size), h):
        for x in range(max(0, w - size), w):
            px[x, y] = (0, 0, 0) if (x + y) % 2 == 0 else (255, 255, 255)
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the patch must arrive as drawn
    return atomic_write_bytes(dst, buf.getvalue())


def triggered_samples(samples: Sequence, target: str, out_dir: Path, size: int) -> list:
    """Copies of VQA ``samples`` whose image carries the trigger and whose answer is ``target``."""
    out = []
    for s in samples:
        dst = Path(out_dir) / f"{Path(s.image_path).stem}-trigger.png"
        if not dst.is_file():
            trigger_image(Path(s.image_path), dst, size)
        out.append(
            replace(
                s, image_path=dst, answers=(target,) * max(1, len(s.answers)), multiple_choice_answer=target
            )
        )
    return out


def attack_data(adv: Adversary, data: ClientData, *, work_dir: Path, name: str, seed: int) -> ClientData:
    """The local data an adversary trains on (label_flip, backdoor); the others train honestly."""
    if adv.kind == "label_flip":
        pool = [s.multiple_choice_answer for s in data.train]
        flipped = [
            replace(
                s,
                multiple_choice_answer=(w := wrong_answer(s.multiple_choice_answer, pool)),
                answers=(w,) * max(1, len(s.answers)),
            )
            for s in data.train
        ]
        return replace(data, train=flipped)
    if adv.kind == "backdoor":
        gen = torch.Generator().manual_seed(derive_seed(seed, "backdoor", name))
        k = max(1, round(adv.poison_fraction * len(data.train))) if data.train else 0
        picked = sorted(torch.randperm(len(data.train), generator=gen)[:k].tolist())
        poisoned = triggered_samples(
            [data.train[i] for i in picked],
            adv.target_answer,
            Path(work_dir) / TRIGGER_DIR / name,
            adv.trigger_size,
        )
        return replace(data, train=[*data.train, *poisoned])
    return data


def run_site_round(
    family,
    *,
    adversary: Adversary | None,
    client_id: str,
    global_state: AdapterState,
    data: ClientData,
    spec,
    base_seed: int,
    rnd: int,
    progress=None,
    proximal_mu: float = 0.0,
    frozen_suffixes: tuple[str, ...] = (),
) -> ClientUpdate:
    """One site's round, honest or not (``data`` is already the adversary's, see :func:`attack_data`)."""
    update = run_client_round(
        family,
        client_id=client_id,
        global_state=global_state,
        data=data,
        spec=spec,
        base_seed=base_seed,
        rnd=rnd,
        progress=progress,
        proximal_mu=proximal_mu,
        frozen_suffixes=frozen_suffixes,
    )
    if adversary is None:
        return update
    return adversary.tamper(update, global_state, seed=derive_seed(base_seed, "adversary", client_id, rnd))


def arm(cfg: Config, name: str, data: ClientData, *, work_dir: Path) -> tuple[Adversary | None, ClientData]:
    """Site ``name``'s adversary (None when honest) and the data it trains on."""
    adv = adversary_of(cfg, name)
    if adv is None:
        return None, data
    return adv, attack_data(adv, data, work_dir=work_dir, name=name, seed=cfg.seed)


def backdoor_test_set(a: AdversaryConfig, test: Sequence, work_dir: Path) -> list:
    """Triggered copies of the test questions whose answer is not already the target, labelled with the
    target: their VQA accuracy is the attack success rate (percent)."""
    target = canonical_answer(a.target_answer)
    keep = [s for s in test if canonical_answer(s.multiple_choice_answer) != target]
    return triggered_samples(keep, target, Path(work_dir) / TRIGGER_DIR / "test", a.trigger_size)

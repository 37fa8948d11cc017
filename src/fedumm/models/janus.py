"""The Janus family (built-in tiny Janus and real Janus / Janus-Pro checkpoints from a local path).

Everything model-specific lives here: loading, LoRA targets per tower, VQA batches, loss, answers.
A real Janus-Pro checkpoint is a configuration change: point ``model.path`` at its local HF
directory and set a prompt template matching its chat format.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from PIL import Image
from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor

from fedumm.errors import ConfigError, DataError
from fedumm.models.base import MODELS, LoraSpec, attach_lora

log = logging.getLogger(__name__)

__all__ = ["JanusFamily", "TOWER_PREFIXES", "TOWER_MODULES", "BUILTIN_PATH"]

BUILTIN_PATH = Path(__file__).resolve().parent.parent / "assets" / "janus-tiny"

# Towers of a Janus model (full module-name prefixes, regex) and the LoRA targets inside each.
TOWER_PREFIXES: dict[str, str] = {
    "vision": r"model\.(?:vision_model|aligner)",
    "language": r"model\.language_model",
    "generation": r"model\.(?:generation_aligner|generation_head)",
}
TOWER_MODULES: dict[str, tuple[str, ...]] = {
    "vision": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "hidden_layers.0"),
    "language": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "generation": ("fc1", "hidden_layers.0", "proj_out", "vision_head"),
}


class _ImageCache:
    """Small LRU of decoded RGB images, so an image asked about by several questions is read once."""

    def __init__(self, capacity: int = 20000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Path, Image.Image] = OrderedDict()

    def get(self, path: Path) -> Image.Image:
        img = self._items.get(path)
        if img is None:
            try:
                with Image.open(path) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError) as exc:
                raise DataError(f"{path}: cannot read image ({exc})") from None
            self._items[path] = img
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(path)
        return img


@MODELS.register("janus")
class JanusFamily:
    """A frozen Janus backbone with one peft LoRA adapter and the task hooks the loop needs."""

    def __init__(
        self,
        *,
        model: JanusForConditionalGeneration,
        processor: JanusProcessor,
        prompt_template: str = "<image_placeholder> question: {question} answer:",
        max_answer_tokens: int = 3,
        device: torch.device | str = "cpu",
        alignment_tokens: int = 0,
    ) -> None:
        if "{question}" not in prompt_template:
            raise ConfigError(f"model.prompt_template must contain '{{question}}', got {prompt_template!r}")
        image_token = processor.tokenizer.image_token
        if image_token not in prompt_template:
            raise ConfigError(f"model.prompt_template must contain the image token {image_token!r}")
        self.base = model
        self.model: PeftModel | None = None
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_template = prompt_template
        self.max_answer_tokens = max_answer_tokens
        self.device = torch.device(device)
        self.images = _ImageCache()
        self._image_tokens: dict[Path, torch.Tensor] = {}  # frozen VQ codes of training images
        self.alignment: tuple[str, ...] = ()
        self._use_alignment(alignment_tokens)

    def _use_alignment(self, n: int) -> None:
        """Shared alignment tokens sit right after the image (understanding) and right before it
        (generation: the prompt's last tokens before begin-of-image)."""
        image_token = self.tokenizer.image_token
        template = self.prompt_template.replace(image_token + "".join(self.alignment), image_token, 1)
        self.alignment = self._alignment_tokens(n)
        self.prompt_template = template.replace(image_token, image_token + "".join(self.alignment), 1)

    def _alignment_tokens(self, n: int) -> tuple[str, ...]:
        if n < 0:
            raise ConfigError(f"lora.alignment_tokens must be >= 0, got {n}")
        if n == 0:
            return ()
        names = tuple(f"<align_{i}>" for i in range(n))
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in names if t not in vocab]
        if missing:
            raise ConfigError(
                f"lora.alignment_tokens={n}: the checkpoint's tokenizer lacks {missing[0]!r}"
                f" (it reserves {sum(t.startswith('<align_') for t in vocab)} alignment tokens)"
            )
        return names

    @contextlib.contextmanager
    def pretrained_prompts(self) -> Iterator[JanusFamily]:
        """Within the block, prompts carry no alignment tokens: the pretrained model's own format.

        The zero-shot baseline is the pretrained model as shipped, which never saw the (reserved,
        untrained) alignment tokens; inserting them would handicap it.
        """
        n = len(self.alignment)
        self._use_alignment(0)
        try:
            yield self
        finally:
            self._use_alignment(n)

    def alignment_token_ids(self) -> list[int]:
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(self.alignment))]

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, device: str = "cpu", **kwargs: Any
    ) -> JanusFamily:
        """Load a local HF Janus directory (None: the built-in tiny checkpoint); no downloads."""
        path = Path(path) if path else BUILTIN_PATH
        if not (path / "config.json").is_file():
            hint = (
                " (run `fedumm pretrain` to rebuild the built-in checkpoint)" if path == BUILTIN_PATH else ""
            )
            raise ConfigError(f"model.path {str(path)!r} holds no HF checkpoint (config.json missing){hint}")
        model = JanusForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = JanusProcessor.from_pretrained(path, local_files_only=True)
        model.to(device)
        model.eval()
        return cls(model=model, processor=processor, device=device, **kwargs)

    def lora_target(self, spec: LoraSpec) -> str:
        """Regex (peft fullmatch) for the LoRA target modules inside the chosen towers."""
        parts = []
        for g in spec.groups:
            if g not in TOWER_PREFIXES:
                raise ConfigError(f"lora.groups: unknown tower {g!r}; known: {', '.join(TOWER_PREFIXES)}")
            mods = spec.target_modules if spec.target_modules else TOWER_MODULES[g]
            alt = "|".join(re.escape(m) for m in mods)
            parts.append(rf"{TOWER_PREFIXES[g]}\.(?:.*\.)?(?:{alt})")
        return "|".join(f"(?:{p})" for p in parts)

    def attach_lora(self, spec: LoraSpec, *, seed: int) -> PeftModel:
        """Freeze the backbone and add the LoRA adapter (same initial A on every participant)."""
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = attach_lora(
            self.base,
            spec=spec,
            target=self.lora_target(spec),
            seed=seed,
            trainable_tokens={"embed_tokens": self.alignment_token_ids()} if self.alignment else None,
        )
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if n == 0:
            raise ConfigError(
                f"LoRA matched no module for groups {spec.groups} and targets {spec.target_modules}"
            )
        return self.model

    def load_adapter(self, path: str | Path) -> PeftModel:
        """Load a saved peft adapter (e.g. a run's ``global_adapter/``), alignment tokens included."""
        import json as _json

        path = Path(path)
        config_file = path / "adapter_config.json"
        try:
            config = _json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a peft adapter directory ({exc})") from None
        tokens = (config.get("trainable_token_indices") or {}).get("embed_tokens") or []
        self._use_alignment(len(tokens))
        if self.alignment and self.alignment_token_ids() != list(tokens):
            raise ConfigError(
                f"{config_file}: trainable tokens {tokens} are not this model's alignment tokens"
            )
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.model = PeftModel.from_pretrained(self.base, path, is_trainable=False)
        return self.model

    @staticmethod
    def group_of(key: str) -> str:
        """Tower of a canonical adapter key (per-modality aggregation); alignment tokens are their own."""
        if ".trainable_tokens_" in key:
            return "alignment"
        for g, prefix in TOWER_PREFIXES.items():
            if re.search(rf"(?:^|\.){prefix}\.", key):
                return g
        return "other"

    # ---- understanding (VQA) -----------------------------------------------------------------------
    def _prompts(self, samples: Sequence[Any]) -> list[str]:
        return [self.prompt_template.format(question=s.question) for s in samples]

    def vqa_batch(self, samples: Sequence[Any], *, with_answers: bool) -> dict[str, torch.Tensor]:
        """Token ids (prompt [+ answer + eos]), attention mask, pixels and labels (answer tokens only)."""
        prompts = self._prompts(samples)
        imgs = [self.images.get(Path(s.image_path)) for s in samples]
        # the processor expands each image token to boi + N image tokens + eoi
        enc = self.processor(text=prompts, images=imgs, return_tensors="pt", padding=True)
        pixel_values = enc["pixel_values"]  # (B, 3, H, W)
        prompt_ids = [
            row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)
        ]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for ids, s in zip(prompt_ids, samples, strict=True):
            ids = list(ids)
            lab = [-100] * len(ids)
            if with_answers:
                ans = self.tokenizer(" " + s.multiple_choice_answer, add_special_tokens=False)[
                    "input_ids"
                ] + [eos]
                ids += ans
                lab += ans
            seqs.append(ids)
            labels.append(lab)
        width = max(len(x) for x in seqs)
        if with_answers:  # right padding for training
            input_ids = [x + [pad] * (width - len(x)) for x in seqs]
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in seqs]
            labels = [x + [-100] * (width - len(x)) for x in labels]
        else:  # left padding for generation
            input_ids = [[pad] * (width - len(x)) + x for x in seqs]
            mask = [[0] * (width - len(x)) + [1] * len(x) for x in seqs]
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "pixel_values": pixel_values,
        }
        if with_answers:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _net(self) -> torch.nn.Module:
        return self.model if self.model is not None else self.base

    def vqa_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (HF's causal-LM loss, labels shifted inside)."""
        out = self._net()(**batch)
        return out.loss

    @torch.no_grad()
    def vqa_answer(self, samples: Sequence[Any]) -> list[str]:
        """Greedy short answers, decoded without special tokens."""
        batch = self.vqa_batch(samples, with_answers=False)
        config = GenerationConfig(
            max_new_tokens=self.max_answer_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        net = self._net()
        was_training = net.training
        net.eval()
        try:
            out = net.generate(**batch, generation_config=config)
        finally:
            net.train(was_training)
        new = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- generation (text -> image tokens) -----------------------------------------------------------
    def generation_prompt(self, text: str) -> str:
        """The text a caption or GenEval prompt becomes (alignment tokens appended)."""
        return f"{text} {''.join(self.alignment)}" if self.alignment else text

    def image_tokens(self, paths: Sequence[Path]) -> torch.Tensor:
        """(N, h*w) image-token ids of the frozen VQ tokenizer, cached per image file."""
        from fedumm.models.janus_generation import encode_images

        todo = [p for p in dict.fromkeys(Path(p) for p in paths) if p not in self._image_tokens]
        if todo:
            codes = encode_images(self.base, self.processor, [self.images.get(p) for p in todo])
            self._image_tokens.update(zip(todo, codes, strict=True))
        return torch.stack([self._image_tokens[Path(p)] for p in paths])

    def caption_batch(
        self, samples: Sequence[Any], *, generator: torch.Generator, cfg_drop_prob: float = 0.1
    ) -> dict[str, torch.Tensor]:
        """Text-to-image training batch of caption samples (``caption``, ``image_path``)."""
        from fedumm.models.janus_generation import t2i_batch

        tokens = self.image_tokens([Path(s.image_path) for s in samples])
        prompts = [self.generation_prompt(s.caption) for s in samples]
        return t2i_batch(
            self._net(), self.processor, prompts, tokens, cfg_drop_prob=cfg_drop_prob, generator=generator
        )

    def caption_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-image-token cross-entropy (teacher forcing) through the adapter."""
        from fedumm.models.janus_generation import t2i_loss

        return t2i_loss(self._net(), dict(batch))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        images_per_prompt: int = 4,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[Image.Image]:
        """Sample images for ``prompts`` with classifier-free guidance (prompt-major order, seeded)."""
        from fedumm.models.janus_generation import generate_images

        return generate_images(
            self._net(),
            self.processor,
            [self.generation_prompt(p) for p in prompts],
            num_images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            seed=seed,
        )

    def full_model_bytes(self) -> int:
        """Bytes of every backbone parameter at its stored dtype (what full fine-tuning would send)."""
        return sum(p.numel() * p.element_size() for n, p in self.base.named_parameters() if "lora_" not in n)

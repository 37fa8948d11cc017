"""The Janus family's model class: built-in tiny Janus and real Janus / Janus-Pro checkpoints from a path.

Everything Janus-specific lives in this folder: loading, VQA batches, loss, answers, text-to-image
tokens, sampling, pretraining. A real Janus-Pro checkpoint is a configuration change: point
``model.path`` at its local HF directory and set a prompt template matching its chat format.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import AutoTokenizer, GenerationConfig, JanusForConditionalGeneration, JanusProcessor

from fedumm.errors import ConfigError
from fedumm.models.base import FamilyOptions, ModelFamily
from fedumm.models.images import EncodingCache, ImageCache
from fedumm.models.janus import INFO

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

__all__ = ["JanusFamily", "BUILTIN_PATH"]

BUILTIN_PATH = Path(__file__).resolve().parents[2] / "assets" / "janus-tiny"


def _check_loading_info(path: Path, info: Mapping[str, Any]) -> None:
    """One ConfigError line unless every stored tensor filled a parameter and none is left unset."""
    problems = []
    for what, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys"))):
        keys = sorted(keys or ())
        if keys:
            problems.append(f"{len(keys)} {what} tensor(s), e.g. {keys[0]!r}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape, e.g. {mismatched[0][0]!r}")
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).splitlines()[0])
    if problems:
        raise ConfigError(
            f"model.path {str(path)!r}: the weights do not match config.json: {'; '.join(problems)}"
        )


class JanusFamily(ModelFamily):
    """A frozen Janus backbone with one peft LoRA adapter and the task hooks the loop needs."""

    info = INFO

    def __init__(
        self,
        *,
        model: JanusForConditionalGeneration,
        processor: JanusProcessor,
        prompt_template: str = INFO.default_prompt_template,
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
        self.images = ImageCache()
        self.encodings = EncodingCache()  # pixels per image, token ids per prompt and answer
        self._image_tokens: dict[Path, torch.Tensor] = {}  # frozen VQ codes of training images
        self.alignment: tuple[str, ...] = ()
        self.use_alignment(alignment_tokens)

    @property
    def num_alignment(self) -> int:
        return len(self.alignment)

    def use_alignment(self, n: int) -> None:
        """Shared alignment tokens sit right after the image (understanding) and right before it
        (generation: the prompt's last tokens before begin-of-image)."""
        image_token = self.tokenizer.image_token
        template = self.prompt_template.replace(image_token + "".join(self.alignment), image_token, 1)
        self.encodings.clear()  # new tokens may tokenize cached text differently
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

    def alignment_token_ids(self) -> list[int]:
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(self.alignment))]

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def builtin_path(cls) -> Path:
        return BUILTIN_PATH

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, options: FamilyOptions | None = None
    ) -> JanusFamily:
        """Load a local HF Janus directory (None: the built-in tiny checkpoint); no downloads.

        The directory is checked first (:func:`.layout.check_directory`: config, tied or separate
        output head, generation_config.json's begin-of-image id, tokenizer and processor files), then
        loaded strictly: every stored tensor must fill a parameter and every parameter must be stored.
        """
        from fedumm.models.janus.layout import check_directory, check_tokens

        options = options or FamilyOptions()
        path = Path(path) if path else BUILTIN_PATH
        if not (path / "config.json").is_file():
            hint = (
                " (run `fedumm pretrain` to rebuild the built-in checkpoint)" if path == BUILTIN_PATH else ""
            )
            raise ConfigError(f"model.path {str(path)!r} holds no HF checkpoint (config.json missing){hint}")
        found = check_directory(path)
        try:
            model, info = JanusForConditionalGeneration.from_pretrained(
                path, local_files_only=True, output_loading_info=True, **found.config_overrides
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model.path {str(path)!r}: transformers cannot load it ({first})") from None
        _check_loading_info(path, info)
        head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
        tied = head is embed or head.data_ptr() == embed.data_ptr()
        if tied == found.separate_lm_head:
            raise ConfigError(
                f"{path / 'config.json'}: the model was built {'tied' if tied else 'untied'} but the weights"
                f" {'hold' if found.separate_lm_head else 'lack'} lm_head.weight"
            )
        # the tokenizer's special tokens first: JanusProcessor itself fails on a missing one
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model.path {str(path)!r}: the tokenizer cannot be loaded ({first})") from None
        boi = check_tokens(path, tokenizer, model.config.text_config.vocab_size, found.boi_token_id)
        processor = JanusProcessor.from_pretrained(path, local_files_only=True)
        # transformers' image generation reads it from here; a file derived from the model config
        # (fedumm's own tiny checkpoints) carries none, so the tokenizer's begin-of-image token fills it
        gen_kwargs = dict(getattr(model.generation_config, "generation_kwargs", None) or {})
        model.generation_config.generation_kwargs = gen_kwargs | {"boi_token_id": boi}
        model.to(options.device)
        return cls._around(model, processor, options)

    @classmethod
    def _around(cls, model, processor, options: FamilyOptions) -> JanusFamily:
        """The family around a loaded or freshly built model, in eval mode."""
        model.eval()
        return cls(
            model=model,
            processor=processor,
            device=options.device,
            prompt_template=options.prompt_template or INFO.default_prompt_template,
            max_answer_tokens=options.max_answer_tokens,
            alignment_tokens=options.alignment_tokens,
        )

    @classmethod
    def random_weights(
        cls,
        model_config: str | Path,
        generator_config: str | Path | None = None,
        *,
        options: FamilyOptions | None = None,
        dtype: str = "bf16",
        seed: int = 0,
    ) -> JanusFamily:
        """Janus-Pro at the shapes of a converted checkpoint's ``config.json`` (e.g.
        configs/models/Janus-Pro-7B.json), random weights created on ``options.device`` (see
        :func:`.layout.random_janus_pro`); no checkpoint, no download."""
        from fedumm.io import read_json_object
        from fedumm.models.janus.layout import random_janus_pro

        if generator_config is not None:
            raise ConfigError("the Janus family has no separate generator config: give its config.json only")
        options = options or FamilyOptions()
        full = read_json_object(model_config, error=ConfigError)
        try:
            model, processor = random_janus_pro(full, device=options.device, dtype=dtype, seed=seed)
        except ConfigError as exc:
            raise ConfigError(f"{model_config}: {exc}") from None
        return cls._around(model, processor, options)

    @classmethod
    def write_tiny(cls, out_dir: str | Path, *, seed: int = 0) -> Path:
        from fedumm.data.synth import VOCABULARY
        from fedumm.models.janus.tiny import build_processor, build_tiny_janus, build_tokenizer

        tok = build_tokenizer(VOCABULARY)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_tiny_janus(tok)
        model.save_pretrained(out_dir)
        build_processor(tok).save_pretrained(out_dir)
        return Path(out_dir)

    @classmethod
    def pretrain(
        cls,
        data_dir: str | Path,
        out_dir: str | Path | None = None,
        *,
        seed: int = 0,
        overrides: Mapping[str, Any] | None = None,
        progress=None,
    ) -> dict:
        """Pretrain the tiny Janus on the public split (see :mod:`.pretrain`)."""
        from fedumm.models.base import spec_from_overrides
        from fedumm.models.janus.pretrain import PretrainSpec, pretrain

        spec = spec_from_overrides(PretrainSpec, overrides or {}, seed=seed)
        return pretrain(data_dir, out_dir or BUILTIN_PATH, make_family=cls, spec=spec, progress=progress)

    # ---- understanding (VQA) -----------------------------------------------------------------------
    def _prompts(self, samples: Sequence[Any]) -> list[str]:
        return [self.prompt_template.format(question=s.question) for s in samples]

    def _encode(self, samples: Sequence[Any], prompts: Sequence[str]) -> tuple[list, torch.Tensor]:
        """Prompt ids (image token expanded to boi + N image tokens + eoi) and pixels, cached.

        Only what the cache lacks goes through the processor, in one call: every image and every
        prompt is processed on its own inside it, so cached and fresh encodings are the same."""
        paths = [Path(s.image_path) for s in samples]
        ids = {p: self.encodings.get(("prompt", p)) for p in dict.fromkeys(prompts)}
        pixels = {p: self.encodings.get(("pixels", p)) for p in dict.fromkeys(paths)}
        missing = [
            i
            for i, (t, p) in enumerate(zip(prompts, paths, strict=True))
            if ids[t] is None or pixels[p] is None
        ]
        if missing:
            enc = self.processor(
                text=[prompts[i] for i in missing],
                images=[self.images.get(paths[i]) for i in missing],
                return_tensors="pt",
                padding=True,
            )
            for j, i in enumerate(missing):
                row = enc["input_ids"][j][enc["attention_mask"][j].bool()].tolist()
                ids[prompts[i]] = row
                pixels[paths[i]] = enc["pixel_values"][j].clone()  # not a view of the whole batch
                self.encodings.put(("prompt", prompts[i]), row)
                self.encodings.put(("pixels", paths[i]), pixels[paths[i]])
        return [ids[t] for t in prompts], torch.stack([pixels[p] for p in paths])

    def _answer_ids(self, answer: str) -> list[int]:
        got = self.encodings.get(("answer", answer))
        if got is None:
            got = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            self.encodings.put(("answer", answer), got)
        return got

    def vqa_batch(self, samples: Sequence[Any], *, with_answers: bool) -> dict[str, torch.Tensor]:
        """Token ids (prompt [+ answer + eos]), attention mask, pixels and labels (answer tokens only)."""
        prompt_ids, pixel_values = self._encode(samples, self._prompts(samples))  # pixels (B, 3, H, W)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for ids, s in zip(prompt_ids, samples, strict=True):
            ids = list(ids)
            lab = [-100] * len(ids)
            if with_answers:
                ans = self._answer_ids(s.multiple_choice_answer) + [eos]
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

    def vqa_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (HF's causal-LM loss, labels shifted inside)."""
        out = self.net()(**batch)
        return out.loss

    @torch.no_grad()
    def vqa_answer(self, samples: Sequence[Any]) -> list[str]:
        """Greedy short answers, decoded without special tokens."""
        batch = self.vqa_batch(samples, with_answers=False)
        # max_length, not max_new_tokens: transformers fills in its default max_length (20) before
        # it checks for a clash, so max_new_tokens logs "both ... have been set" on every batch; the
        # two are the same bound here (the prompt length + the answer tokens)
        config = GenerationConfig(
            max_length=batch["input_ids"].shape[1] + self.max_answer_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        net = self.net()
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
        from fedumm.models.janus.generation import encode_images

        todo = [p for p in dict.fromkeys(Path(p) for p in paths) if p not in self._image_tokens]
        if todo:
            codes = encode_images(self.base, self.processor, [self.images.get(p) for p in todo])
            self._image_tokens.update(zip(todo, codes, strict=True))
        return torch.stack([self._image_tokens[Path(p)] for p in paths])

    def caption_batch(
        self, samples: Sequence[Any], *, generator: torch.Generator, cfg_drop_prob: float = 0.1
    ) -> dict[str, torch.Tensor]:
        """Text-to-image training batch of caption samples (``caption``, ``image_path``)."""
        from fedumm.models.janus.generation import t2i_batch

        tokens = self.image_tokens([Path(s.image_path) for s in samples])
        prompts = [self.generation_prompt(s.caption) for s in samples]
        return t2i_batch(
            self.net(), self.processor, prompts, tokens, cfg_drop_prob=cfg_drop_prob, generator=generator
        )

    def caption_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-image-token cross-entropy (teacher forcing) through the adapter."""
        from fedumm.models.janus.generation import t2i_loss

        return t2i_loss(self.net(), dict(batch))

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
        from fedumm.models.janus.generation import generate_images

        return generate_images(
            self.net(),
            self.processor,
            [self.generation_prompt(p) for p in prompts],
            num_images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            seed=seed,
        )

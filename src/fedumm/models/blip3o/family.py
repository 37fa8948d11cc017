"""The BLIP3o family's model class: understanding through Qwen2.5-VL's own forward, generation as
BLIP3o does it (latent queries -> language model -> DiT, flow matching on frozen image features).

Understanding batches are what ``Qwen2_5_VLProcessor`` would build (its class needs torchvision, so
the tokenizer and ``Qwen2VLImageProcessorPil`` are driven directly): the prompt's image pad token is
expanded to one token per merged patch, ``pixel_values`` / ``image_grid_thw`` come from the image
processor and ``mm_token_type_ids`` marks the image tokens for the multimodal rotary positions.

Generation (see :mod:`.generation`): the prompt, then the query-span start token and ``n_query``
slots whose embeddings are the learnable latent queries; the language model's last hidden states at
those slots condition the DiT, which predicts the flow-matching velocity of the target features.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from transformers import GenerationConfig, PreTrainedTokenizerFast

from fedumm.errors import ConfigError
from fedumm.models.base import FamilyOptions, ModelFamily
from fedumm.models.blip3o import INFO
from fedumm.models.blip3o import generation as G
from fedumm.models.blip3o.model import Blip3oModel
from fedumm.models.blip3o.tiny import IMAGE_PAD, QUERY_START, VISION_END, build_image_processor
from fedumm.models.images import EncodingCache, ImageCache

if TYPE_CHECKING:
    from peft import PeftModel

log = logging.getLogger(__name__)

__all__ = ["Blip3oFamily", "BUILTIN_PATH", "SAMPLING_STEPS"]

BUILTIN_PATH = Path(__file__).resolve().parents[2] / "assets" / "blip3o-tiny"
SAMPLING_STEPS = 12  # Euler steps of the flow-matching sampler (BLIP3o uses 30 at full scale)


class Blip3oFamily(ModelFamily):
    """A frozen BLIP3o model with one peft LoRA adapter and the task hooks the loop needs."""

    info = INFO

    def __init__(
        self,
        *,
        model: Blip3oModel,
        tokenizer: PreTrainedTokenizerFast,
        image_processor=None,
        prompt_template: str = INFO.default_prompt_template,
        max_answer_tokens: int = 3,
        device: torch.device | str = "cpu",
        alignment_tokens: int = 0,
        sampling_steps: int = SAMPLING_STEPS,
        generation_template: str = "{text}",
    ) -> None:
        if "{question}" not in prompt_template:
            raise ConfigError(f"model.prompt_template must contain '{{question}}', got {prompt_template!r}")
        if IMAGE_PAD not in prompt_template:
            raise ConfigError(f"model.prompt_template must contain the image token {IMAGE_PAD!r}")
        self.base = model
        self.model: PeftModel | None = None
        self.tokenizer = tokenizer
        self.image_processor = image_processor or build_image_processor()
        self.prompt_template = prompt_template
        self.max_answer_tokens = max_answer_tokens
        self.device = torch.device(device)
        self.sampling_steps = sampling_steps
        if "{text}" not in generation_template:
            raise ConfigError(f"the generation template must contain '{{text}}', got {generation_template!r}")
        self.generation_template = generation_template
        self.images = ImageCache()
        self.encodings = EncodingCache()  # patches per image, token ids per prompt and answer
        self._features: dict[Path, torch.Tensor] = {}  # frozen target features per training image
        self.alignment: tuple[str, ...] = ()
        self.use_alignment(alignment_tokens)

    # ---- alignment tokens ----------------------------------------------------------------------------
    @property
    def num_alignment(self) -> int:
        return len(self.alignment)

    def use_alignment(self, n: int) -> None:
        """Shared alignment tokens sit right after the image (understanding) and right before the query
        span (generation)."""
        if n < 0:
            raise ConfigError(f"lora.alignment_tokens must be >= 0, got {n}")
        names = tuple(f"<align_{i}>" for i in range(n))
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in names if t not in vocab]
        if missing:
            raise ConfigError(
                f"lora.alignment_tokens={n}: the checkpoint's tokenizer lacks {missing[0]!r}"
                f" (it reserves {sum(t.startswith('<align_') for t in vocab)} alignment tokens)"
            )
        self.alignment = names

    def alignment_token_ids(self) -> list[int]:
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(self.alignment))]

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def builtin_path(cls) -> Path:
        return BUILTIN_PATH

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, *, options: FamilyOptions | None = None
    ) -> Blip3oFamily:
        """Load a fedumm BLIP3o checkpoint directory (None: the built-in tiny one); no downloads."""
        options = options or FamilyOptions()
        path = Path(path) if path else BUILTIN_PATH
        from fedumm.models.blip3o import layout

        if layout.is_released_layout(path):
            return cls._from_released(path, options)
        if not (path / "config.json").is_file():
            hint = " (run `fedumm pretrain --family blip3o` to build it)" if path == BUILTIN_PATH else ""
            raise ConfigError(
                f"model.path {str(path)!r} holds no BLIP3o checkpoint (config.json missing){hint}"
            )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model = Blip3oModel.load(path)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        model.to(options.device)
        model.eval()
        return cls(
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            device=options.device,
            prompt_template=options.prompt_template or INFO.default_prompt_template,
            max_answer_tokens=options.max_answer_tokens,
            alignment_tokens=options.alignment_tokens,
        )

    @classmethod
    def _from_released(cls, path: Path, options: FamilyOptions) -> Blip3oFamily:
        """A released BLIP3o-Model-4B/8B directory, read in place (see :mod:`.layout`): BLIP3o's chat
        prompts, its 30 sampling steps; the site's target encoder and decoder from ``fedumm_site.json``
        or ``options.extra`` (``target_encoder``, ``decoder``)."""
        from fedumm.models.blip3o import layout

        model, tokenizer, image_processor = layout.load_released(path, options.extra)
        model.to(options.device)
        model.eval()
        return cls._released(model, tokenizer, image_processor, options)

    @classmethod
    def _released(cls, model, tokenizer, image_processor, options: FamilyOptions) -> Blip3oFamily:
        """The family around a model in the released layout: BLIP3o's prompts and sampling steps."""
        from fedumm.models.blip3o import layout

        return cls(
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            device=options.device,
            prompt_template=options.prompt_template or layout.VQA_TEMPLATE,
            max_answer_tokens=options.max_answer_tokens,
            alignment_tokens=options.alignment_tokens,
            sampling_steps=layout.SAMPLING_STEPS,
            generation_template=layout.GENERATION_TEMPLATE,
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
    ) -> Blip3oFamily:
        """BLIP3o-Model at the shapes of its backbone's Qwen2.5-VL config (configs/models/
        Qwen2.5-VL-7B-Instruct.json for BLIP3o-8B) and its DiT's (configs/models/BLIP3o-8B-DiT.json),
        random weights created on ``options.device`` (see :func:`.layout.random_released`), BLIP3o's
        prompts and sampling steps; no checkpoint, no download."""
        from fedumm.io import read_json_object
        from fedumm.models.blip3o import layout

        if generator_config is None:
            raise ConfigError("BLIP3o needs its DiT's config too (e.g. configs/models/BLIP3o-8B-DiT.json)")
        options = options or FamilyOptions()
        flat = read_json_object(model_config, error=ConfigError)
        dit = read_json_object(generator_config, error=ConfigError)
        try:
            model, tokenizer, image_processor = layout.random_released(
                Path(model_config).parent,
                flat,
                dit,
                device=options.device,
                dtype=dtype,
                seed=seed,
                extra=options.extra,
            )
        except ConfigError as exc:
            raise ConfigError(f"{model_config} + {generator_config}: {exc}") from None
        model.eval()
        return cls._released(model, tokenizer, image_processor, options)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The backbone-only checkpoint (no adapter): config, weights, tokenizer, image processor."""
        if not isinstance(self.base, Blip3oModel):
            raise ConfigError(
                "a released BLIP3o-Model checkpoint is read in place; fedumm does not re-save it"
            )
        self.base.save(out_dir)
        self.tokenizer.save_pretrained(str(out_dir))
        self.image_processor.save_pretrained(str(out_dir))

    @classmethod
    def write_tiny(cls, out_dir: str | Path, *, seed: int = 0) -> Path:
        from fedumm.data.synth import VOCABULARY
        from fedumm.models.blip3o.tiny import build_tokenizer, tiny_config

        tokenizer = build_tokenizer(VOCABULARY)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Blip3oModel(tiny_config(tokenizer))
        cls(model=model, tokenizer=tokenizer).save_pretrained(out_dir)
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
        """Pretrain a fresh tiny BLIP3o on the public split (see :mod:`.pretrain`)."""
        from fedumm.data.synth import VOCABULARY
        from fedumm.models.base import spec_from_overrides
        from fedumm.models.blip3o.pretrain import PretrainSpec, pretrain
        from fedumm.models.blip3o.tiny import build_tokenizer, tiny_config

        spec = spec_from_overrides(PretrainSpec, overrides or {}, seed=seed)
        tokenizer = build_tokenizer(VOCABULARY)
        torch.manual_seed(spec.seed)
        family = cls(model=Blip3oModel(tiny_config(tokenizer)), tokenizer=tokenizer)
        return pretrain(family, data_dir, out_dir or BUILTIN_PATH, spec=spec, progress=progress)

    # ---- understanding (VQA) -------------------------------------------------------------------------
    def _image_inputs(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches (n, 3*2*p*p), grid_thw (3,)) of one image, cached: the image processor is slow."""
        got = self.encodings.get(("patches", path))
        if got is None:
            enc = self.image_processor([self.images.get(path)], return_tensors="pt")
            got = (enc["pixel_values"], enc["image_grid_thw"][0])
            self.encodings.put(("patches", path), got)
        return got

    def _token_ids(self, kind: str, text: str, **kwargs: Any) -> list[int]:
        got = self.encodings.get((kind, text))
        if got is None:
            got = self.tokenizer(text, **kwargs)["input_ids"]
            self.encodings.put((kind, text), got)
        return list(got)

    def _image_tokens(self, grid_thw: torch.Tensor) -> int:
        merge = int(self.base.backbone.config.vision_config.spatial_merge_size)
        return int(grid_thw.prod()) // (merge * merge)

    def _vqa_prompt(self, question: str, n_image_tokens: int) -> str:
        text = self.prompt_template.format(question=question)
        text = text.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens, 1)
        if self.alignment:
            anchor = VISION_END if VISION_END in text else IMAGE_PAD * n_image_tokens
            text = text.replace(anchor, anchor + "".join(self.alignment), 1)
        return text

    def vqa_batch(self, samples: Sequence[Any], *, with_answers: bool) -> dict[str, torch.Tensor]:
        """Token ids (prompt [+ answer + eos]), masks, patches, grids and labels (answer tokens only)."""
        inputs = [self._image_inputs(Path(s.image_path)) for s in samples]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        seqs, labels = [], []
        for s, (_, grid) in zip(samples, inputs, strict=True):
            ids = self._token_ids("prompt", self._vqa_prompt(s.question, self._image_tokens(grid)))
            lab = [-100] * len(ids)
            if with_answers:
                ans = self._token_ids("answer", " " + s.multiple_choice_answer, add_special_tokens=False)
                ans = ans + [eos]
                ids, lab = ids + ans, lab + ans
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
        ids_t = torch.tensor(input_ids, dtype=torch.long)
        batch = {
            "input_ids": ids_t,
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "pixel_values": torch.cat([p for p, _ in inputs]),  # (sum of patches, 3*2*p*p)
            "image_grid_thw": torch.stack([g for _, g in inputs]),  # (B, 3)
            "mm_token_type_ids": (ids_t == self.base.backbone.config.image_token_id).long(),
        }
        if with_answers:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return {k: v.to(self.device) for k, v in batch.items()}

    def vqa_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens (Qwen2.5-VL's own causal-LM loss)."""
        return self.base.backbone(**batch).loss

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
        lm = self.base.backbone
        was_training = lm.training
        lm.eval()
        try:
            out = lm.generate(**batch, generation_config=config)
        finally:
            lm.train(was_training)
            lm.model.rope_deltas = None  # generate() caches rotary offsets on the model; drop them
        new = out[:, batch["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- generation (text -> image features -> pixels) -----------------------------------------------
    def generation_prompt(self, text: str) -> str:
        """The text a caption or GenEval prompt becomes (alignment tokens last, before the queries)."""
        body = f"{text} {''.join(self.alignment)}" if self.alignment else text
        return self.generation_template.format(text=body)

    def _query_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt + query-start + query slots: (ids (B, T), attention mask (B, T))."""
        cfg = self.base.config
        tail = [self.tokenizer.convert_tokens_to_ids(QUERY_START)] + [cfg.query_token_id] * cfg.n_query
        seqs = [self.tokenizer(self.generation_prompt(t))["input_ids"] + tail for t in texts]
        width = max(len(x) for x in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def target_features(self, paths: Sequence[Path]) -> torch.Tensor:
        """(N, C, h, w) standardised features of the frozen target encoder, cached per image file."""
        todo = [p for p in dict.fromkeys(Path(p) for p in paths) if p not in self._features]
        if todo:
            encoder = self.base.target_encoder
            if encoder is None:  # a released checkpoint whose site provides none: encode_features says so
                self.base.encode_features(torch.zeros(0))
            pixels = G.pixels_from_images([self.images.get(p) for p in todo]).to(self.device)
            was = encoder.training
            encoder.eval()
            feats = self.base.encode_features(pixels).cpu()
            encoder.train(was)
            self._features.update(zip(todo, feats, strict=True))
        return torch.stack([self._features[Path(p)] for p in paths]).to(self.device)

    def caption_batch(
        self, samples: Sequence[Any], *, generator: torch.Generator, cfg_drop_prob: float = 0.1
    ) -> dict[str, torch.Tensor]:
        """Flow-matching batch: prompt ids, the targets, and the noise, noise levels and caption drops
        drawn from ``generator``."""
        ids, mask = self._query_ids([s.caption for s in samples])
        features = self.target_features([Path(s.image_path) for s in samples])
        return {"input_ids": ids, "attention_mask": mask, "features": features} | G.draw_noise(
            features.shape, generator=generator, cfg_drop_prob=cfg_drop_prob, device=self.device
        )

    def caption_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Flow-matching MSE of the DiT's velocity (target: noise - features), BLIP3o's image loss."""
        condition = G.condition(self.base, batch["input_ids"], batch["attention_mask"])
        return G.flow_loss(self.base, condition, batch)

    @torch.no_grad()
    def generate_features(
        self,
        prompts: Sequence[str],
        *,
        images_per_prompt: int = 4,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> torch.Tensor:
        """Sampled image features (N, C, h, w) for ``prompts`` (prompt-major order): seeded Euler steps
        with classifier-free guidance; ``temperature`` scales the initial noise. No decoder needed."""
        net = self.base
        was_training = net.training
        net.eval()
        try:
            ids, mask = self._query_ids(list(prompts))
            condition = G.condition(net, ids, mask)  # (P, n_query, hidden)
            return G.sample(
                net,
                condition.repeat_interleave(images_per_prompt, dim=0),
                steps=self.sampling_steps,
                guidance_scale=guidance_scale,
                temperature=temperature,
                seed=seed,
            )
        finally:
            net.train(was_training)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        images_per_prompt: int = 4,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> list[Image.Image]:
        """Sample images for ``prompts`` (prompt-major order): the features of
        :meth:`generate_features`, decoded to pixels."""
        features = self.generate_features(
            prompts,
            images_per_prompt=images_per_prompt,
            guidance_scale=guidance_scale,
            temperature=temperature,
            seed=seed,
        )
        net = self.base
        was_training = net.training
        net.eval()
        try:
            pixels = net.decode_features(features)
        finally:
            net.train(was_training)
        return G.images_from_pixels(pixels)

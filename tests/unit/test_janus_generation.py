"""Janus generation side: VQ training step, HF-exact quantizer, text-to-image batches and loss, sampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import JanusForConditionalGeneration

from fedumm.data import render
from fedumm.errors import ConfigError
from fedumm.models.base import LoraSpec
from fedumm.models.janus import generation as G
from fedumm.models.janus.family import JanusFamily
from fedumm.models.janus.tiny import build_processor, build_tiny_janus, build_tokenizer

WORDS = ["a", "small", "large", "red", "blue", "green", "circle", "square", "triangle", "and", ",", "."]
CAPTIONS = [
    "a small red circle.",
    "a large blue square and a small green triangle.",
    "a red square.",
    "a circle.",
]


def tiny(seed: int = 0):
    """A fresh built-in tiny Janus (64-entry codebook) and its processor."""
    tok = build_tokenizer(WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_janus(tok, codebook_size=64)
    return model, build_processor(tok)


def too_fine_vq(seed: int = 0):
    """The tiny Janus with one VQ level fewer: its latent grid no longer matches generate/decode."""
    tok = build_tokenizer(WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = build_tiny_janus(tok, codebook_size=64).config
        config.vq_config.channel_multiplier = list(config.vq_config.channel_multiplier)[:-1]
        model = JanusForConditionalGeneration(config)
    return model, build_processor(tok)


def scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    allowed = [(c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    return [
        render.render_scene(render.sample_scene(rng, n_objects=1 + i % 2, allowed=allowed)) for i in range(n)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these models are tiny: one thread is fastest and robust to a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return scenes(4)


def test_vq_loss_decreases_and_codebook_stays_on_sphere(images):
    model, proc = tiny()
    pixels = G.pixel_values(proc, images)  # (4, 3, 64, 64)
    with torch.no_grad():
        before, stats = G.vq_loss(model, pixels, lowpass_weight=0.0)
    assert {"recon_l1", "recon_l2", "codebook", "commit", "code_usage", "perplexity"} <= set(stats)
    assert 0.0 < stats["code_usage"] <= 1.0
    with torch.no_grad():
        assert float(G.vq_loss(model, pixels, lowpass_weight=1.0)[0]) > float(before)
    out = G.train_vq(model, images, proc, steps=20, batch_size=4, lr=2e-3, seed=0, warmup_steps=2)
    with torch.no_grad():
        after, _ = G.vq_loss(model, pixels, lowpass_weight=0.0)
    assert float(after) < 0.6 * float(before)
    assert out["steps"] == 20 and 0.0 < out["code_usage"] <= 1.0
    norms = model.model.vqmodel.quantize.embedding.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # training leaves the requires_grad flags and the (frozen, eval) VQ mode as they were
    assert not model.model.vqmodel.training


def test_quantizer_indices_match_hf_encode(images):
    model, proc = tiny(seed=1)
    vq = model.model.vqmodel
    pixels = G.pixel_values(proc, images)
    G.normalize_codebook(model)
    with torch.no_grad():
        ours = G._vq_forward(vq, pixels)["indices"]  # (4 * 64,)
        hf = vq.encode(pixels).image_tokens  # (4 * 64,)
        z = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, vq.quantize.embedding_dim)
        cosine = (F.normalize(z, dim=-1) @ vq.quantize.embedding.weight.T).argmax(-1)
    assert torch.equal(ours, hf)
    # with a unit-norm codebook HF's raw L2 rule is the cosine rule of the normalised decode path
    assert torch.equal(cosine, hf)
    assert torch.equal(G.encode_images(model, proc, images), hf.view(len(images), -1))


def test_t2i_batch_shapes_and_masking():
    model, proc = tiny()
    tok = proc.tokenizer
    bos, boi, pad = tok.bos_token_id, tok.convert_tokens_to_ids(tok.boi_token), tok.pad_token_id
    tokens = torch.randint(
        64, (len(CAPTIONS), G.generation_tokens(model)), generator=torch.Generator().manual_seed(0)
    )
    batch = G.t2i_batch(
        model, proc, CAPTIONS, tokens, cfg_drop_prob=0.0, generator=torch.Generator().manual_seed(0)
    )
    b, length = batch["input_ids"].shape
    assert b == len(CAPTIONS)
    assert batch["attention_mask"].shape == batch["labels"].shape == (b, length + G.generation_tokens(model))
    assert (batch["input_ids"][:, -1] == boi).all()  # prompt ends with the begin-of-image token
    assert not batch["dropped"].any()
    labels = batch["labels"]
    assert (labels[:, :length] == -100).all()
    assert torch.equal(labels[:, length:], tokens)
    assert (batch["attention_mask"][:, length:] == 1).all()
    # left padding: the shortest caption's row starts with masked pads
    short = int(batch["attention_mask"][:, :length].sum(1).argmin())
    assert batch["input_ids"][short, 0] == pad and batch["attention_mask"][short, 0] == 0

    dropped = G.t2i_batch(
        model, proc, CAPTIONS, tokens, cfg_drop_prob=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert dropped["dropped"].all()
    # HF's unconditional branch: all but BOS and BOI become pad, attention mask unchanged
    expected = batch["input_ids"].clone()
    expected[(expected != bos) & (expected != boi)] = pad
    assert torch.equal(dropped["input_ids"], expected)
    assert torch.equal(dropped["attention_mask"], batch["attention_mask"])


def test_t2i_loss_is_image_token_cross_entropy_and_padding_invariant():
    model, proc = tiny()
    model.eval()
    tokens = torch.randint(64, (2, G.generation_tokens(model)), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    pair = G.t2i_batch(model, proc, CAPTIONS[:2], tokens, cfg_drop_prob=0.0, generator=gen)
    alone = G.t2i_batch(model, proc, CAPTIONS[:1], tokens[:1], cfg_drop_prob=0.0, generator=gen)
    with torch.no_grad():
        loss_alone = G.t2i_loss(model, alone)
        # manual: generation head on the hidden states of BOI .. second-to-last image token
        text = model.get_input_embeddings()(alone["input_ids"])
        image = model.prepare_embeddings_for_image_generation(alone["image_tokens"])
        hidden = model.model.language_model(
            inputs_embeds=torch.cat([text, image], 1), attention_mask=alone["attention_mask"]
        ).last_hidden_state
        length = alone["input_ids"].shape[1]
        logits = model.model.generation_head(hidden[:, length - 1 : -1])  # (1, 64, K)
        manual = F.cross_entropy(logits.flatten(0, 1), tokens[0])
        assert torch.allclose(loss_alone, manual, atol=1e-5)
        # the short caption is left-padded in the pair batch; its loss must not change
        per_row = []
        for i in range(2):
            row = {k: v[i : i + 1] for k, v in pair.items()}
            per_row.append(G.t2i_loss(model, row))
        assert torch.allclose(per_row[0], loss_alone, atol=1e-4)
        assert torch.allclose(G.t2i_loss(model, pair), (per_row[0] + per_row[1]) / 2, atol=1e-5)


def test_t2i_loss_reaches_generation_tower_lora():
    model, proc = tiny()
    fam = JanusFamily(model=model, processor=proc)
    peft_model = fam.attach_lora(LoraSpec(rank=4, alpha=8, groups=("language", "generation")), seed=0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    for module in (
        "generation_aligner.fc1",
        "generation_aligner.hidden_layers.0",
        "generation_head.proj_out",
        "generation_head.vision_head",
        "self_attn.q_proj",
        "self_attn.o_proj",
    ):
        assert any(module in n for n in names), module
    tokens = torch.randint(64, (2, G.generation_tokens(model)), generator=torch.Generator().manual_seed(0))
    batch = G.t2i_batch(
        peft_model, proc, CAPTIONS[:2], tokens, cfg_drop_prob=0.0, generator=torch.Generator().manual_seed(0)
    )
    G.t2i_loss(peft_model, batch).backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    # B starts at zero, so the gradient shows up on B; every adapted layer must get one
    for n, g in grads.items():
        if "lora_B" in n:
            assert g is not None and float(g.abs().sum()) > 0, n
    assert all("lora_" in n for n in grads)
    # one optimiser step on the adapter changes the loss
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    with torch.no_grad():
        before = float(G.t2i_loss(peft_model, batch))
        opt.step()
        assert float(G.t2i_loss(peft_model, batch)) != before


def test_generate_images_seeded_and_sized():
    model, proc = tiny()
    state = torch.random.get_rng_state()
    a = G.generate_images(model, proc, CAPTIONS[:2], num_images_per_prompt=2, guidance_scale=3.0, seed=7)
    b = G.generate_images(model, proc, CAPTIONS[:2], num_images_per_prompt=2, guidance_scale=3.0, seed=7)
    c = G.generate_images(model, proc, CAPTIONS[:2], num_images_per_prompt=2, guidance_scale=3.0, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG side effect
    assert len(a) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in a)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]
    # guidance 1 (no CFG) and greedy decoding also run
    assert len(G.generate_images(model, proc, CAPTIONS[:1], num_images_per_prompt=1, guidance_scale=1.0)) == 1
    assert len(G.generate_images(model, proc, CAPTIONS[:1], num_images_per_prompt=1, temperature=0.0)) == 1
    with pytest.raises(ValueError):
        G.generate_images(model, proc, CAPTIONS[:1], guidance_scale=0.5)


def test_caption_dropout_rate():
    model, proc = tiny()
    n = 2000
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    tokens = torch.zeros(n, G.generation_tokens(model), dtype=torch.long)
    batch = G.t2i_batch(
        model, proc, captions, tokens, cfg_drop_prob=0.1, generator=torch.Generator().manual_seed(0)
    )
    rate = float(batch["dropped"].float().mean())
    assert 0.08 < rate < 0.12
    again = G.t2i_batch(
        model, proc, captions, tokens, cfg_drop_prob=0.1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again["dropped"], batch["dropped"])


def test_inconsistent_generation_grid_is_rejected(images):
    model, proc = too_fine_vq()
    with pytest.raises(ConfigError, match="channel_multiplier"):
        G.check_generation_config(model)
    with pytest.raises(ConfigError):
        G.encode_images(model, proc, images[:1])


def test_builtin_tiny_janus_generation_grid():
    tok = build_tokenizer(WORDS)
    with torch.random.fork_rng(devices=[]):
        G.check_generation_config(build_tiny_janus(tok, codebook_size=64))


def test_dead_codes_move_to_badly_reconstructed_latents():
    weight = torch.nn.Parameter(
        F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    )
    opt = torch.optim.AdamW([weight], lr=1e-3)
    ema = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # codes 1, 3, 6 are dead
    latents = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    error = torch.zeros(10)
    error[7] = 1.0  # only latent 7 reconstructs badly
    alive = weight.detach()[[0, 2, 4, 5, 7]].clone()
    gen = torch.Generator().manual_seed(0)
    assert G._reinit_dead_codes(weight, ema, latents, error, opt, gen, threshold=0.05) == 3
    assert torch.equal(weight.detach()[[0, 2, 4, 5, 7]], alive)
    for code in (1, 3, 6):
        assert float(weight.detach()[code] @ latents[7]) > 0.99
    assert (ema[[1, 3, 6]] > 0.05).all()

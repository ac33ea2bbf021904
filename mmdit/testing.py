"""Stand-ins for released SD3 models, built offline in the real formats: what tests and benchmarks load through
exactly the code that loads released models (and what the toy world starts its components from).

Real architectures at tiny widths with random weights: CLIP-L- and CLIP-G-architecture text towers with the real
CLIP vocabulary and tokenizer (from open_clip's bundled BPE merges), a T5 v1.1 encoder with a SentencePiece
tokenizer trained here on a small caption corpus, a 16-channel AutoencoderKL with SD3's latent factors, an MM-DiT,
and the flow scheduler with shift 3.0, saved as a diffusers StableDiffusion3Pipeline directory.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import torch

from mmdit.checkpoint import diffusers_config, to_diffusers
from mmdit.config import MMDiTConfig
from mmdit.model import MMDiT
from mmdit.text import CLIP_BOS, CLIP_EOS, clip_tokenizer_from_open_clip
from mmdit.vae import SD3_SCALING_FACTOR, SD3_SHIFT_FACTOR

# Widths: CLIP-L + CLIP-G (64 + 128) < T5 (256), so the zero padding of the CLIP channels is exercised.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 64, 128, 256


def caption_corpus() -> list[str]:
    """Captions phrased like GenEval's prompts, plus a few free sentences: the T5 tokenizer's training text."""
    colors = "red green blue yellow purple orange pink brown black white gray".split()
    shapes = "circle square triangle star hexagon".split()
    counts = "one two three four".split()
    relations = ["left of", "right of", "above", "below"]
    corpus = [f"a photo of a {c} {s}" for c in colors for s in shapes]
    corpus += [f"a photo of {n} {c} {s}s" for n in counts for c in colors for s in shapes]
    corpus += [f"a photo of a {c} {s} {r} a {c2} {s2}"
               for c, s, c2, s2, r in itertools.product(colors[:4], shapes, colors[4:8], shapes, relations)]
    corpus += ["a photo of a cat and a dog", "an astronaut riding a horse on the moon, highly detailed",
               "The quick brown fox jumps over the lazy dog."]
    return corpus


def train_t5_tokenizer(corpus: list[str], vocab_size: int = 200, model_type: str = "unigram"):
    """A transformers T5Tokenizer over a SentencePiece model trained on corpus (pad 0, EOS 1, unk 2). T5's own is a
    unigram model; on a corpus of few distinct sentences (the toy world's) unigram seeding stalls at characters,
    so the toy uses BPE pieces, which the T5 tokenizer segments the same way (highest-scoring pieces)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type=model_type, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _randomize(module: torch.nn.Module, std: float, generator: torch.Generator):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def tiny_components(seed: int = 0, qk_norm: bool = True, x_self_attn_layers=(0,), corpus: list[str] | None = None,
                    clip_tokens: int = 77, t5_tokens: int | None = None, vae=None,
                    mmdit_config: MMDiTConfig | None = None,
                    clip_widths: tuple[int, int] = (CLIP_L_WIDTH, CLIP_G_WIDTH), shift: float = 3.0) -> dict:
    """Random tiny components, keyed as StableDiffusion3Pipeline's constructor arguments. corpus: the T5
    tokenizer's training text; clip_tokens / t5_tokens: the lengths the tokenizers declare (model_max_length);
    vae: a trained AutoencoderKL instead of a random one; mmdit_config: the transformer's shape; clip_widths:
    CLIP-L's and CLIP-G's; shift: the scheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    g = torch.Generator().manual_seed(seed)

    def clip(width, act, pad_id):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                num_hidden_layers=2, num_attention_heads=max(1, width // 64),
                                max_position_embeddings=clip_tokens,
                                hidden_act=act, projection_dim=width, bos_token_id=CLIP_BOS,
                                eos_token_id=CLIP_EOS, pad_token_id=pad_id)
        model = CLIPTextModelWithProjection(config).eval()
        _randomize(model, 0.05, g)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name and name.endswith("weight"):
                    p.add_(1.0)
        return model

    clip_l = clip(clip_widths[0], "quick_gelu", CLIP_EOS)
    with torch.no_grad():  # SD3's CLIP-L projection is the identity
        clip_l.text_projection.weight.copy_(torch.eye(clip_widths[0]))
    clip_g = clip(clip_widths[1], "gelu", 0)

    t5_tokenizer = (train_t5_tokenizer(corpus, vocab_size=120, model_type="bpe") if corpus
                    else train_t5_tokenizer(caption_corpus()))
    if t5_tokens is not None:
        t5_tokenizer.model_max_length = t5_tokens
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=32, num_heads=4, d_ff=256,
                                 num_layers=2, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, use_cache=False)).eval()
    _randomize(t5, 0.05, g)
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0)
        # Token embeddings 20x the other weights, so each state stays mostly its own token, as a trained T5's do:
        # at the other weights' scale two random layers mix every token with its context, and a model trained on
        # such states learns the trained word combinations but cannot compose new ones (README: the toy world).
        t5.shared.weight.copy_(torch.randn(t5.shared.weight.shape, generator=g))

    tokenizer_l = clip_tokenizer_from_open_clip()
    tokenizer_g = clip_tokenizer_from_open_clip()
    tokenizer_g.pad_token = "!"  # CLIP-G pads with id 0
    for tok in (tokenizer_l, tokenizer_g):
        tok.model_max_length = clip_tokens

    if vae is None:
        vae = random_vae(g)
    mmdit = MMDiT(mmdit_config or MMDiTConfig(depth=2, num_heads=2, head_dim=16, context_dim=T5_WIDTH,
                                              pooled_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=32,
                                              qk_norm=qk_norm, x_self_attn_layers=tuple(x_self_attn_layers)))
    _randomize(mmdit, 0.05, g)
    config = {k: v for k, v in diffusers_config(mmdit.config).items() if not k.startswith("_")}
    transformer = SD3Transformer2DModel.from_config(config)
    transformer.load_state_dict(to_diffusers(mmdit.state_dict(), mmdit.config), strict=True)

    return dict(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                text_encoder=clip_l, tokenizer=tokenizer_l, text_encoder_2=clip_g, tokenizer_2=tokenizer_g,
                text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def random_vae(generator: torch.Generator):
    """A 16-channel AutoencoderKL with SD3's factors and 4 levels (8x down), random weights."""
    from diffusers import AutoencoderKL

    g = generator
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=SD3_SCALING_FACTOR,
                        shift_factor=SD3_SHIFT_FACTOR, sample_size=64).eval()
    _randomize(vae, 0.05, g)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return vae


def save_tiny_pipeline(path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny random SD3 pipeline as a diffusers directory that StableDiffusion3Pipeline loads."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    StableDiffusion3Pipeline(**tiny_components(seed, **kwargs)).save_pretrained(path)
    return path


class ShardServer:
    """A local HTTP server (127.0.0.1, a free port, its own thread) serving a folder, with faults on demand:
    `missing` names answer 404, `cut` names send their full Content-Length but only half their bytes, then close.
    What tests and `mmdit.bench data` stream shards from: `with ShardServer(folder) as url: ...`."""

    def __init__(self, root, missing=(), cut=()):
        self.root, self.missing, self.cut = Path(root), set(missing), set(cut)
        self.requests: list[str] = []

    def __enter__(self) -> str:
        import http.server
        import threading

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                path = server.root / name
                if name in server.missing or not path.is_file() or ".." in Path(name).parts:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if name in server.cut else data)
                if name in server.cut:
                    self.close_connection = True

            def log_message(self, *args):   # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

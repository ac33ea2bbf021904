"""Typed configuration: the single source of defaults for every part of mmdit.

Model sizes are named presets with the SD3 width rule written once (`paper_depth`): hidden = 64 * depth,
depth heads of 64. Only `mmdit.checkpoint` infers a config from tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of one MM-DiT. Every field is a shape or a switch that changes the weights."""

    depth: int = 24                      # number of joint blocks
    num_heads: int = 24                  # attention heads; hidden = num_heads * head_dim
    head_dim: int = 64
    patch_size: int = 2
    in_channels: int = 16                # latent channels of SD3's VAE
    context_dim: int = 4096              # width of the text tokens (T5-XXL's; CLIP states are zero-padded to it)
    pooled_dim: int = 2048               # CLIP-L pooled (768) + CLIP-G pooled (1280)
    pos_embed_max_size: int = 192        # side of the stored position table; caps the latent at 2 * this
    qk_norm: bool = False                # per-head RMSNorm on q and k (SD3.5)
    x_self_attn_layers: tuple[int, ...] = ()   # MMDiT-X: blocks with an extra image-only self-attention
    mlp_ratio: float = 4.0
    frequency_dim: int = 256             # width of the sinusoidal timestep embedding

    def __post_init__(self):
        object.__setattr__(self, "x_self_attn_layers", tuple(sorted(int(i) for i in self.x_self_attn_layers)))
        problems = []
        if self.depth < 1:
            problems.append(f"depth must be >= 1, got {self.depth}")
        if self.patch_size < 1:
            problems.append(f"patch_size must be >= 1, got {self.patch_size}")
        bad = [i for i in self.x_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            problems.append(f"x_self_attn_layers {bad} lie outside blocks 0..{self.depth - 1}")
        if self.frequency_dim % 2:
            problems.append(f"frequency_dim must be even, got {self.frequency_dim}")
        if problems:
            raise ValueError("invalid MMDiTConfig: " + "; ".join(problems))

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["x_self_attn_layers"] = list(self.x_self_attn_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MMDiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)


def paper_depth(depth: int, **overrides) -> MMDiTConfig:
    """The SD3 paper's family: hidden 64 * depth, depth heads of 64 (MMDiT-ps2-d{depth})."""
    return MMDiTConfig(**{"depth": depth, "num_heads": depth, "head_dim": 64, **overrides})


def _tiny(**overrides) -> MMDiTConfig:
    """A few-thousand-parameter model for tests: every code path, no size."""
    base = dict(depth=2, num_heads=2, head_dim=8, context_dim=32, pooled_dim=24, pos_embed_max_size=16)
    return MMDiTConfig(**{**base, **overrides})


MODEL_PRESETS: dict[str, MMDiTConfig] = {
    "sd3-medium": paper_depth(24, pos_embed_max_size=192),
    "sd3.5-medium": paper_depth(24, pos_embed_max_size=384, qk_norm=True, x_self_attn_layers=tuple(range(13))),
    "sd3.5-large": paper_depth(38, pos_embed_max_size=192, qk_norm=True),
    "tiny": _tiny(),
    "tiny-sd3.5": _tiny(qk_norm=True, x_self_attn_layers=(0,)),
    # The toy world's model (configs/toy.yaml): SD3.5's design (heads of 64, QK norm) at a width a CPU trains in
    # minutes; its text widths are the toy encoders' (T5 256, pooled CLIP-L 32 + CLIP-G 32). Patch 1 on the 8x8
    # latent gives 64 image tokens: an object spans several tokens and "left of" several columns, which every small
    # setup that learns shapes and relations has (README: the toy world); 16 tokens do not.
    "toy": MMDiTConfig(depth=6, num_heads=2, head_dim=64, patch_size=1, context_dim=256, pooled_dim=64,
                       pos_embed_max_size=16, qk_norm=True),
}
# The paper's scaling family d = 2..38 (d=24 is SD3 Medium's shape, d=38 the 8B).
MODEL_PRESETS.update({f"d{d}": paper_depth(d) for d in range(2, 40, 2)})


def model_preset(name: str) -> MMDiTConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; accepted: {', '.join(MODEL_PRESETS)}") from None


@dataclass(frozen=True)
class TextLayout:
    """How the three encoders' outputs form the MM-DiT's conditioning (see mmdit.text.assemble).

    context = [CLIP-L tokens | CLIP-G tokens | zeros up to context_dim] (clip_tokens rows), then T5's t5_tokens
    rows; pooled = [CLIP-L pooled | CLIP-G pooled]. The widths are SD3's; tiny test models use their own.
    """

    clip_l_dim: int = 768
    clip_g_dim: int = 1280
    context_dim: int = 4096              # T5-XXL's width
    clip_tokens: int = 77
    t5_tokens: int = 77                  # Stability's reference pads T5 to 77; diffusers' default is 256

    def __post_init__(self):
        if self.clip_l_dim + self.clip_g_dim > self.context_dim:
            raise ValueError(f"CLIP widths {self.clip_l_dim} + {self.clip_g_dim} exceed the context width "
                             f"{self.context_dim}")
        if self.t5_tokens < 1:
            raise ValueError(f"the T5 sequence length must be >= 1, got {self.t5_tokens}")

    @property
    def pooled_dim(self) -> int:
        return self.clip_l_dim + self.clip_g_dim


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow training settings (see mmdit.flow). Sampling defaults live with sample.py's options."""

    timestep_sampling: str = "lognorm"   # uniform | lognorm | mode | cosmap: the paper's default is lognorm(0, 1)
    lognorm_mean: float = 0.0
    lognorm_std: float = 1.0
    mode_scale: float = 1.29
    train_shift: float = 1.0             # resolution shift applied to training sigmas; 1.0 = none
    loss_weighting: str = "none"         # none | sigma_sqrt | cosmap


def _finite_in(value, low: float, high: float, low_open: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > low if low_open else value >= low) and value <= high)


def _first_settings_problem(s: "Settings") -> str | None:
    """The first field of sampling settings that is out of range, as a line naming the field and the range."""
    def whole(value, low, high):
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    checks = [
        ("steps", whole(s.steps, 1, MAX_STEPS), f"an integer in [1, {MAX_STEPS}]"),
        ("cfg", _finite_in(s.cfg, 0, MAX_GUIDANCE),
         f"a finite number in [0, {MAX_GUIDANCE}] (<= 1 turns guidance off)"),
        ("shift", s.shift is None or _finite_in(s.shift, 0, MAX_SHIFT, low_open=True),
         f"a finite number in (0, {MAX_SHIFT}]"),
        ("sampler", s.sampler in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
        # a multiple of the VAE's 8 here; the model may ask for more (x its patch size: SD3Pipeline.check_size)
        ("width", whole(s.width, 1, MAX_SIDE) and s.width % 8 == 0, f"a multiple of 8 in [8, {MAX_SIDE}]"),
        ("height", whole(s.height, 1, MAX_SIDE) and s.height % 8 == 0, f"a multiple of 8 in [8, {MAX_SIDE}]"),
        ("negative_prompt", isinstance(s.negative_prompt, str), "a string"),
        ("slg_layers", all(whole(i, 0, 10_000) for i in s.slg_layers), "block indices >= 0"),
        ("slg_scale", _finite_in(s.slg_scale, 0, MAX_GUIDANCE), f"a finite number in [0, {MAX_GUIDANCE}]"),
        ("slg_start", _finite_in(s.slg_start, 0, 1), "a fraction in [0, 1]"),
        ("slg_end", _finite_in(s.slg_end, 0, 1) and s.slg_end >= s.slg_start, "a fraction in [slg_start, 1]"),
    ]
    for name, ok, accepted in checks:
        if not ok:
            return f"{name} must be {accepted}, got {getattr(s, name)!r}"
    return None


# Sampling ranges: wide enough for any real use, narrow enough that a typo or a NaN is refused before any work.
MAX_STEPS, MAX_GUIDANCE, MAX_SHIFT, MAX_SIDE = 10_000, 100, 100, 16_384

# The names recipes and command lines accept, declared once; mmdit.flow implements each (tests/test_config.py).
TIMESTEP_SAMPLERS = ("uniform", "lognorm", "mode", "cosmap")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SAMPLERS = ("euler", "heun", "dpmpp_2m")
PRECISIONS = ("auto", "bf16", "fp32")   # auto: bf16 where it is faster here (mmdit.precision)
OPTIMIZERS = ("adamw", "muon")   # muon: Muon on the blocks' matrices, AdamW on the rest (mmdit.optim)
SHARD_DTYPES = ("float16", "bfloat16")   # how shards store tensors (mmdit.shards)


# A pipeline directory may carry its own sampling defaults in this file ({"cfg": 2.0, "slg_layers": [2, 3]}; the
# keys: mmdit.sampling_cli.sampling_defaults); diffusers ignores it.
SAMPLING_DEFAULTS_FILE = "mmdit_sampling.json"


@dataclass(frozen=True)
class Settings:
    """Everything besides the prompt and seed that decides an image (written into each PNG): what sample.py and
    the GenEval generator turn their flags into (mmdit.sampling_cli)."""

    steps: int = 28
    cfg: float = 7.0                    # classifier-free guidance; <= 1 turns it off
    shift: float | None = None          # None: the model's scheduler shift (3.0 for every released SD3 / SD3.5)
    sampler: str = "euler"
    width: int = 1024                   # sample.py and the GenEval generator default to the model's own size
    height: int = 1024
    negative_prompt: str = ""
    slg_layers: tuple[int, ...] = ()    # skip-layer guidance (SD3.5 Medium: 7, 8, 9); empty = off
    slg_scale: float = 2.8
    slg_start: float = 0.01
    slg_end: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "slg_layers", tuple(self.slg_layers))
        problem = _first_settings_problem(self)
        if problem:
            raise ValueError(problem)

    def record(self) -> dict:
        """Plain JSON-ready data (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# What a LoRA may adapt, as suffixes of our module names: both streams' attention projections (and SD3.5's second
# image attention) and MLPs, as diffusers' SD3 LoRA script and kohya's sd3 network target.
LORA_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float | None = None           # None = rank (scale 1)
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def lora_alpha(self) -> float:
        """alpha as given, or the rank (scale 1) when none was."""
        return self.alpha if self.alpha is not None else self.rank

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        """model.lora of a recipe; a bad value is a ValueError of one line."""
        unknown = sorted(set(d) - {"rank", "alpha", "dropout", "targets"})
        if unknown:
            raise ValueError(f"unknown key model.lora.{unknown[0]}; accepted: rank, alpha, dropout, targets")
        rank, alpha, dropout = d.get("rank", 16), d.get("alpha"), d.get("dropout", 0.0)
        targets = d.get("targets", LORA_TARGETS)
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096:
            raise ValueError(f"model.lora.rank must be a whole number in [1, 4096], got {rank!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not 0 < alpha < float("inf")):
            raise ValueError(f"model.lora.alpha must be a positive number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {dropout!r}")
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(f"model.lora.targets: {bad[0] if bad else 'none given'}; accepted: "
                             f"{', '.join(LORA_TARGETS)}")
        return cls(rank, None if alpha is None else float(alpha), float(dropout), targets)



@dataclass(frozen=True)
class ModelSection:
    preset: str = "d24"                  # a name in MODEL_PRESETS
    overrides: dict = dataclasses.field(default_factory=dict)   # MMDiTConfig fields that differ from the preset
    init_from: str | None = None         # a checkpoint in any format load_mmdit reads; None = from scratch
    activation_checkpointing: bool = False
    # LoRA fine-tuning of init_from (LoraSpec's keys: rank, alpha, dropout, targets); {} = train every weight
    lora: dict = dataclasses.field(default_factory=dict)

    def lora_spec(self) -> "LoraSpec | None":
        return LoraSpec.from_dict(self.lora) if self.lora else None

    def build_config(self) -> MMDiTConfig:
        try:
            return dataclasses.replace(model_preset(self.preset), **self.overrides)
        except TypeError:
            known = [f.name for f in dataclasses.fields(MMDiTConfig)]
            bad = sorted(set(self.overrides) - set(known))
            raise ValueError(f"unknown model override {bad[:1]}; accepted: {', '.join(known)}") from None


@dataclass(frozen=True)
class DataSection:
    # Where shards come from (mmdit.sources): a folder with manifest.json, a manifest file or URL, a brace pattern
    # of paths or URLs, a pipe: command; or a list of those, each a string or {source: SPEC, weight: W}.
    shards: str | tuple = ""
    val_shards: str | tuple = ""         # held-out shards for the validation loss ("" = none)
    batch_size: int = 32                 # per rank and micro-step
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False              # endless shard resampling (multi-node) instead of exact epochs
    retries: int = 2                     # attempts after the first for a remote shard that fails to open or breaks off
    retry_delay: float = 1.0             # seconds before the first retry, doubling after each
    timeout: float = 30.0                # seconds: connect timeout and stall limit of a remote read
    caption_variant_probs: tuple[float, ...] = (0.5, 0.5)   # the paper's original / synthetic caption mix
    # A module of mmdit whose prepare(shards, val_shards, prepare_args, device) makes the shards when they are
    # missing (configs/toy.yaml: mmdit.toy.prepare, which builds the toy world); "" = the shards must exist. Its
    # optional check(shards, val_shards, prepare_args) reads shards that are there (every launch and rank).
    prepare: str = ""
    prepare_args: tuple[str, ...] = ()   # its arguments (for the toy world: data/make_toy.py world's flags)


@dataclass(frozen=True)
class TextSection:
    # Each encoder is dropped independently (its part of the conditioning becomes zeros), as in the SD3 paper.
    drop_clip_l: float = 0.463
    drop_clip_g: float = 0.463
    drop_t5: float = 0.463


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000             # linear warm-up, then constant (the paper's schedule)
    cooldown_steps: int = 0              # then a linear decay to zero over the run's last N steps (0: none; a run
                                         # shorter than N decays all along): warmup-stable-decay
    grad_clip: float = 1.0
    grad_accum: int = 1
    optimizer: str = "adamw"             # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)


@dataclass(frozen=True)
class AlignSection:
    """Representation alignment (mmdit.align, REPA): off at weight 0."""
    weight: float = 0.0                  # the alignment loss's weight beside the flow loss
    block: int = 1                       # whose image-token output is aligned (0-based; an early block, as REPA's)
    encoder: str = ""                    # the frozen feature encoder's folder (config.json + model.safetensors)
    projector_width: int = 512


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100_000
    seed: int = 0
    precision: str = "auto"              # auto | bf16 | fp32: auto measures (mmdit.precision); fp32 master weights
    ema_decay: float = 0.9999
    out_dir: str = "runs/default"
    log_every: int = 10
    val_every: int = 1000
    val_sigmas: int = 8                  # evenly spaced validation noise levels
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 10              # consecutive non-finite losses before the run stops
    compile: bool = False                # torch.compile the model (nn.Module.compile: weights keep their names)
    time_budget_s: float = 0.0           # > 0: seconds from the start by which the steps should end; the run measures
                                         # its step time and shortens itself (steps and cool-down alike) to fit
    deepspeed: str = "configs/deepspeed/zero2.json"   # when several processes run and the launcher names none; "" = DDP
    sample_model: str | None = None      # text encoders + VAE (a pipeline) for image grids at validation
    sample_prompts: tuple[str, ...] = ("a photo of a cat", "a red circle left of a blue square")
    sample_steps: int = 20


@dataclass(frozen=True)
class Config:
    """A training recipe: YAML files hold only what differs from these defaults."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    text: TextSection = TextSection()
    flow: FlowConfig = FlowConfig()
    optim: OptimSection = OptimSection()
    align: AlignSection = AlignSection()
    train: TrainSection = TrainSection()


def _coerce(value, annotation: str, where: str):
    """value checked against a field's annotation (as written in this file); ints widen to floats."""
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    if base == "str | tuple":   # a shard spec: one string, or a list of strings and {source, weight} mappings
        if isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, dict)) for v in value):
            raise ValueError(f"{where}: expected a shard source or a list of them, got {value!r}")
        return tuple(value)
    if base == "tuple[str, ...]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if base.startswith("tuple"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ValueError(f"{where}: expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    expected = kinds[base]
    if base == "float" and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and base != "bool" or not isinstance(value, expected):
        raise ValueError(f"{where}: expected {base}, got {type(value).__name__} {value!r}")
    return float(value) if base == "float" else value


INF = math.inf
# The accepted range of every numeric recipe field that has one: (low, high, low excluded). Integers must be whole,
# floats finite. A value outside stops the run with one line before any compute (a zero interval would divide by
# zero after hours of work; zero steps would export untrained weights).
RECIPE_RANGES = {
    "data.batch_size": (1, INF, False), "data.num_workers": (0, 256, False), "data.shuffle_buffer": (1, INF, False),
    "data.retries": (0, 100, False), "data.retry_delay": (0, 3600, False), "data.timeout": (1, 86400, False),
    "text.drop_clip_l": (0, 1, False), "text.drop_clip_g": (0, 1, False), "text.drop_t5": (0, 1, False),
    "flow.lognorm_std": (0, INF, True), "flow.mode_scale": (-INF, INF, False), "flow.lognorm_mean": (-INF, INF, False),
    "flow.train_shift": (0, INF, True),
    "optim.lr": (0, INF, True), "optim.weight_decay": (0, INF, False), "optim.eps": (0, INF, True),
    "optim.warmup_steps": (0, INF, False), "optim.cooldown_steps": (0, INF, False), "optim.grad_clip": (0, INF, True),
    "optim.grad_accum": (1, INF, False),
    "train.steps": (1, INF, False), "train.ema_decay": (0, 1, False), "train.log_every": (1, INF, False),
    "train.val_every": (1, INF, False), "train.val_sigmas": (1, 1000, False), "train.checkpoint_every": (1, INF, False),
    "train.keep_checkpoints": (1, INF, False), "train.max_bad_steps": (1, INF, False),
    "train.time_budget_s": (0, INF, False),
    "train.sample_steps": (1, MAX_STEPS, False),
    "align.weight": (0, INF, False), "align.block": (0, INF, False), "align.projector_width": (1, INF, False),
}


def _first_recipe_problem(config: Config) -> str | None:
    """The first recipe field out of its range (RECIPE_RANGES), or a malformed list field, as one line."""
    for where, (low, high, low_open) in RECIPE_RANGES.items():
        section, name = where.split(".")
        value = getattr(getattr(config, section), name)
        if not _finite_in(value, low, high, low_open):
            interval = ("(" if low_open else "[") + f"{low}, " + ("inf)" if high == INF else f"{high}]")
            return f"{where} must be a finite number in {interval}, got {value!r}"
    betas = config.optim.betas
    if len(betas) != 2 or not all(_finite_in(b, 0, 1) and b < 1 for b in betas):
        return f"optim.betas must be two numbers in [0, 1), got {list(betas)}"
    probs = config.data.caption_variant_probs
    if not probs or not all(_finite_in(p, 0, INF) for p in probs) or sum(probs) <= 0:
        return f"data.caption_variant_probs must be non-negative weights with a positive sum, got {list(probs)}"
    if config.align.weight > 0 and not config.align.encoder:
        return "align.weight is set but align.encoder is empty: name the feature encoder's folder"
    if config.data.prepare_args and not config.data.prepare:
        return "data.prepare_args is set but data.prepare is empty: name the module that takes them"
    return None


def config_from_dict(d: dict) -> Config:
    """A Config from nested dicts; unknown sections or keys and wrong types fail with one line naming them."""
    sections = {}
    for section in dataclasses.fields(Config):
        given = d.get(section.name, {}) or {}
        if not isinstance(given, dict):
            raise ValueError(f"config section {section.name!r} must be a mapping, got {given!r}")
        cls = section.default.__class__
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise ValueError(f"unknown config key {section.name}.{unknown[0]}; accepted in {section.name}: "
                             f"{', '.join(fields)}")
        sections[section.name] = cls(**{k: _coerce(v, fields[k].type, f"{section.name}.{k}")
                                        for k, v in given.items()})
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r}; accepted: {', '.join(sections)}")
    config = Config(**sections)
    config.model.build_config()  # a bad preset or model override fails here, before any compute
    if config.model.lora_spec() is not None and not config.model.init_from:
        raise ValueError("model.lora adapts a trained model: give model.init_from (a checkpoint, e.g. SD3.5's)")
    choices = [("flow.timestep_sampling", config.flow.timestep_sampling, TIMESTEP_SAMPLERS),
               ("flow.loss_weighting", config.flow.loss_weighting, LOSS_WEIGHTINGS),
               ("train.precision", config.train.precision, PRECISIONS),
               ("optim.optimizer", config.optim.optimizer, OPTIMIZERS)]
    for where, value, accepted in choices:
        if value not in accepted:
            raise ValueError(f"{where} {value!r} is not one of {', '.join(accepted)}")
    if config.model.lora_spec() is not None and config.optim.optimizer != "adamw":
        raise ValueError(f"optim.optimizer {config.optim.optimizer} trains whole matrices: LoRA runs take adamw")
    problem = _first_recipe_problem(config)
    if problem:
        raise ValueError(problem)
    return config


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """A YAML recipe (or the defaults) with `section.key=value` overrides (values parsed as YAML)."""
    import yaml

    d = {}
    if path:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except OSError as e:
            raise ValueError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config {path} must be a mapping of sections (model:, data:, ...), got a "
                             f"{type(d).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r}: expected section.key=value, e.g. optim.lr=3e-4")
        section, name = key.split(".", 1)
        d.setdefault(section, {})
        if isinstance(d[section], dict):
            d[section][name] = yaml.safe_load(value)
    return config_from_dict(d)


def config_to_dict(config: Config) -> dict:
    """Plain data for saving beside checkpoints (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


__all__ = ["MMDiTConfig", "TextLayout", "FlowConfig", "Config", "Settings", "load_config", "config_to_dict",
           "MODEL_PRESETS", "model_preset", "paper_depth"]

"""Train an MM-DiT with the SD3 paper's recipe on precomputed shards.

    python3 train.py                       # the toy world (configs/toy.yaml): data, components, shards, model
    python3 train.py --config configs/tiny.yaml [section.key=value ...] [--resume latest|PATH]
    accelerate launch train.py --config configs/sd3-d24-256.yaml

Per step: draw sigma (lognorm(0, 1) by default, shift only if asked), noise the latents, drop each text encoder
independently (zeros), assemble the conditioning, predict the velocity, MSE to noise - x0, backward, clip, AdamW
(or Muon on the blocks' matrices: optim.optimizer), EMA (fp32). Checkpoints hold model, EMA, optimiser, schedule,
step, the training RNG and the data position, and are written to a temporary folder then renamed; resuming
continues bit for bit. A non-finite loss skips the step; max_bad_steps in a row stop the run. SIGTERM / SIGINT save
a checkpoint and exit.

Several processes (accelerate launch) train with the DeepSpeed file the launcher names, else train.deepspeed (ZeRO-2
by default), or DDP when that is "": each rank reads its own shards, gradients are reduced, and checkpoints hold
every rank's optimizer shard (DeepSpeed) and data position. The phases: check_recipe (every error before compute),
set_up_processes, build_state, announce, the loop in main (optimizer_step, evaluate, checkpoint), export.
"""

import contextlib
import importlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mmdit.cli import Parser
from mmdit.cli import fail as fail_with

HERE = Path(__file__).resolve().parent
DEFAULT_RECIPE = HERE / "configs" / "toy.yaml"
PROG = "train.py"


def get_lr(step: int, base_lr: float, warmup_steps: int, cooldown_steps: int = 0, total_steps: int = 0) -> float:
    """Linear warm-up to base_lr, then constant (the SD3 paper's schedule); with cooldown_steps, a linear decay to
    zero over the last cooldown_steps of total_steps. A function of the step alone, so resuming needs no state."""
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown_steps > 0 and total_steps > 0:   # no run length, nothing to cool down towards
        lr *= min(1.0, max(0, total_steps - step) / min(cooldown_steps, total_steps))
    return lr


def budget_probe_steps(steps: int) -> tuple[int, int]:
    """The steps between which a budgeted run times itself: past the first (compiling, warming caches), and early
    enough that what it decides still has most of the run to act on."""
    probe = min(100, max(2, steps // 10))
    return max(1, probe // 5), probe


def budgeted_schedule(steps: int, cooldown_steps: int, step: int, elapsed_s: float, step_s: float,
                      budget_s: float) -> tuple[int, int]:
    """(steps, cooldown_steps) for a run at `step`, elapsed_s after its start, whose steps take step_s each, to end
    its steps within budget_s: unchanged when they fit, else both shortened in the same proportion (the schedule
    keeps its shape), never to fewer steps than one past this one."""
    fit = step + int(max(0.0, budget_s - elapsed_s) / step_s)
    if fit >= steps:
        return steps, cooldown_steps
    fit = max(step + 1, fit)
    return fit, max(1, round(cooldown_steps * fit / steps)) if cooldown_steps else 0


def update_ema(ema, weights: dict, decay: float):
    """ema <- decay * ema + (1 - decay) * weights (a state dict: master_weights; with LoRA the adapters only), in
    fp32, parameters and buffers."""
    import torch

    with torch.no_grad():
        averaged = ema.state_dict()
        pairs = [(averaged[k], w) for k, w in weights.items() if averaged[k].dtype.is_floating_point]
        targets = [m if m.dtype == e.dtype else m.to(e.dtype) for e, m in pairs]
        torch._foreach_lerp_([e for e, _ in pairs], targets, 1 - decay)  # one fused pass instead of one per tensor


def master_weights(raw_model, fixed: dict | None, trained_only: bool = False) -> dict:
    """The weights to average and save: the module's own state dict; or, where DeepSpeed's module holds only bf16
    copies or ZeRO-3 shards (fixed is not None), the optimizer's fp32 master of every trained parameter (collective:
    every rank must call it) with `fixed`, the frozen parameters and buffers as they were before DeepSpeed cast or
    split them (they never change). trained_only (LoRA): the trained parameters alone."""
    if fixed is None:
        if trained_only:
            return {name: p.detach() for name, p in raw_model.named_parameters() if p.requires_grad}
        return raw_model.state_dict()
    from deepspeed.utils import safe_get_full_fp32_param

    trained = {name: safe_get_full_fp32_param(p) for name, p in raw_model.named_parameters() if p.requires_grad}
    return trained if trained_only else {**fixed, **trained}


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="a YAML recipe in configs/")
    p.add_argument("--resume", help="'latest' or a checkpoint folder (default: start afresh)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4 train.steps=1000")
    return p.parse_args(argv)


def fail(message: str):
    fail_with(PROG, message)


def end_together(accelerator):
    """Several processes leave together, through the process group's own shutdown: a rank that exits while another
    is still exporting can abort in its communication threads' teardown (seen under gloo)."""
    if accelerator is not None:
        import torch

        accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()


def leave(code: int):
    """Exit with `code` once main has returned (its logs, TensorBoard writer and data loaders closed or released).
    Several processes skip the interpreter's teardown: now and then a rank aborted there ("terminate called
    without an active exception", a C++ thread destroyed while joinable, under gloo), failing a run whose work was
    complete."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def choose_engine(recipe_deepspeed: str, world: int, env) -> tuple[str, str | None]:
    """How this launch trains: ("deepspeed", its config file, or None for the launcher's --zero_stage flags),
    ("ddp", None) or ("single", None). What `accelerate launch` says wins: its --use_deepspeed (with or without
    --deepspeed_config_file, or from `accelerate config`); else several processes take the recipe's
    train.deepspeed (relative paths from the repository), or DDP when that is empty. Raises ValueError for a launch
    that started fewer processes than it was asked for, or a DeepSpeed file that is not there."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
        if path and not Path(path).is_file() and (HERE / path).is_file():   # a repository path, launched elsewhere
            path = str(HERE / path)
        if path and not Path(path).is_file():
            raise ValueError(f"accelerate launch --deepspeed_config_file {path}: no such file (relative paths are "
                             f"read from the working directory, then from the repository)")
        return "deepspeed", str(Path(path).resolve()) if path else None
    if world == 1:
        # accelerate's plain launcher given --num_processes N > 1 without --multi_gpu / --use_deepspeed starts one
        # process (and sets MASTER_ADDR for the others it never starts): training alone would be silently wrong
        if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
            raise ValueError("accelerate launch was asked for several processes but started one: add --multi_gpu "
                             "(DDP) or --use_deepspeed (with --cpu accelerate starts one process), or launch one")
        return "single", None
    if not recipe_deepspeed:
        return "ddp", None
    path = Path(recipe_deepspeed) if Path(recipe_deepspeed).is_absolute() else HERE / recipe_deepspeed
    if not path.is_file():
        raise ValueError(f"train.deepspeed {recipe_deepspeed}: no such file ({path}; relative paths are read from the "
                         f"repository; \"\" trains with DDP)")
    return "deepspeed", str(path)


def preparation_step(module: str):
    """The prepare(shards, val_shards, prepare_args, device) function that data.prepare names, or a ValueError."""
    accepted = "a module of mmdit with a prepare(shards, val_shards, prepare_args, device) function, e.g. " \
               "mmdit.toy.prepare"
    try:
        step = getattr(importlib.import_module(module), "prepare", None) if module.startswith("mmdit.") else None
    except ImportError:
        step = None
    if not callable(step):
        raise ValueError(f"data.prepare {module!r}: accepted: {accepted}")
    return step


def export_pipeline(transformer: Path, base: Path, target: Path, depth: int):
    """A diffusers pipeline directory: base's VAE, encoders, scheduler and sampling defaults with the exported
    diffusers transformer folder (copied, not serialised again: for an 8B model that is tens of GB written once, not
    twice), written beside and renamed into place. Skip-layer guidance that base recommends for blocks this
    depth-`depth` MM-DiT lacks (a shallower model than base's) is left out of the copy's defaults."""
    from mmdit.config import SAMPLING_DEFAULTS_FILE
    from mmdit.sampling_cli import sampling_defaults

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=lambda folder, names: ["transformer"] if Path(folder) == base else [])
    shutil.copytree(transformer, tmp / "transformer")
    defaults = tmp / SAMPLING_DEFAULTS_FILE
    if defaults.is_file():   # checked by sampling_defaults at the run's start
        recorded = json.loads(defaults.read_text())
        layers, fitting = recorded.get("slg_layers", []), sampling_defaults(tmp, depth=depth)["slg_layers"]
        if layers != fitting:
            recorded["slg_layers"] = fitting
            defaults.write_text(json.dumps(recorded) + "\n")
            print(f"export: {base}'s skip-layer guidance blocks {layers} do not all exist in this {depth}-block "
                  f"model; the pipeline recommends {recorded['slg_layers']}", file=sys.stderr)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (a missing or truncated file), or None. Reads headers and
    zip directories only: a file cut short loses its end, which both formats need."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not folder.is_dir():
        return "no such folder"
    states = sorted(folder.glob("state_rank*.pt"))
    engine = [folder / "deepspeed"] if (folder / "deepspeed").is_dir() else [folder / "optimizer.pt"]
    lora_run = (folder / "lora.safetensors").exists() or (folder / "ema_lora.safetensors").exists()
    weights = ["lora.safetensors", "ema_lora.safetensors"] if lora_run \
        else ["model.safetensors", "ema.safetensors"]   # a LoRA run's checkpoints hold its adapters only
    for path in [*(folder / w for w in weights), *engine, *(states or [folder / "state_rank0.pt"])]:
        if not path.exists():
            return f"{path.name} is missing"
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    f.keys()
            elif path.suffix == ".pt":
                zipfile.ZipFile(path).close()
        except (SafetensorError, zipfile.BadZipFile, OSError) as e:
            return f"{path.name} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint that can be resumed from; newer incomplete or corrupt ones are named and passed over."""
    for folder in sorted((out_dir / "checkpoints").glob("step_*"), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        print(f"warning: skipping checkpoint {folder}: {problem}", file=sys.stderr)
    return None


def save_checkpoint(out_dir: Path, step: int, model, weights: dict, ema, optimizer, state: dict, keep: int,
                    accelerator=None, deepspeed_engine: bool = False, lora_metadata: dict | None = None,
                    lora_run: bool = False) -> Path:
    """Everything a bit-exact resume needs, written into a temporary folder that is renamed into place; the oldest
    beyond `keep` are removed. Under DeepSpeed every rank writes its optimizer shard and its own RNG / data state.
    lora_run: the adapters alone, ours and EMA (lora.safetensors, ema_lora.safetensors, with lora_metadata, which
    rank 0 is given), never the frozen base."""
    import torch

    from mmdit.checkpoint import atomic_save_file, save_mmdit
    from mmdit.lora import module_to_ours_names, trained_lora

    rank = accelerator.process_index if accelerator else 0
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    folder = out_dir / "checkpoints" / f"step_{step:08d}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    raw = accelerator.unwrap_model(model) if accelerator else model
    if rank == 0 and lora_run:
        atomic_save_file(tmp / "lora.safetensors", {k: v.float() for k, v in module_to_ours_names(weights).items()},
                         lora_metadata)
        atomic_save_file(tmp / "ema_lora.safetensors", trained_lora(ema), lora_metadata)
    elif rank == 0:
        save_mmdit(raw, tmp / "model.safetensors", "native", state=weights)
        save_mmdit(ema, tmp / "ema.safetensors", "native")
    if deepspeed_engine:   # collective: each rank its optimizer shard (a LoRA run's engine state leaves the base out)
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=lora_run)
    elif rank == 0:   # one process, or DDP: every rank holds the same optimizer state
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(state, tmp / f"state_rank{rank}.pt")
    barrier()
    if rank == 0:
        stale = folder.with_name(f".{folder.name}.stale")
        if folder.exists():   # this step saved before (a corrupt checkpoint passed over on resume): replace it
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(folder, stale)
        os.replace(tmp, folder)
        shutil.rmtree(stale, ignore_errors=True)
        for old in sorted((out_dir / "checkpoints").glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    barrier()
    return folder


@contextlib.contextmanager
def outside_zero3_init():
    """transformers' from_pretrained builds a model under deepspeed.zero.Init, a collective, whenever accelerate has
    registered a ZeRO-3 config; rank 0 alone loads the sample grid's encoders, so they are built outside it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref   # transformers offers set / unset, not a getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None and registered() is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered())


def sample_grid(ema, conditioning, cfg, side: int):
    """Images of the fixed prompts from the EMA weights (seeds 0, 1, ...), side by side: (H, W * n, 3) uint8."""
    from mmdit.loading import scheduler_shift
    from mmdit.pipeline import SD3Pipeline, Settings
    from mmdit.sampling_cli import sampling_defaults

    text, vae = conditioning
    pipe = SD3Pipeline(ema, vae, text, scheduler_shift(cfg.train.sample_model))
    prompts = list(cfg.train.sample_prompts)
    # the model folder's own guidance, if it names any, for the blocks this model has
    recommended = sampling_defaults(cfg.train.sample_model, cfg_otherwise=5.0, depth=ema.config.depth)
    settings = Settings(steps=cfg.train.sample_steps, cfg=recommended["cfg"], width=side, height=side,
                        slg_layers=recommended["slg_layers"], slg_scale=recommended["slg_scale"])
    images = pipe.generate(prompts, list(range(len(prompts))), settings)
    return images.transpose(1, 0, 2, 3).reshape(side, side * len(prompts), 3)


def validation_loss(model, batches, layout, cfg, device) -> dict:
    """The paper's validation loss: a fixed held-out set, fixed noise and fixed sigmas (evenly spaced), every text
    encoder present; per sigma and the mean. A local generator leaves the training RNG untouched."""
    import torch

    with torch.no_grad():
        return _validation_loss(model, batches, layout, cfg, device)


def _validation_loss(model, batches, layout, cfg, device) -> dict:
    import torch

    from mmdit import flow
    from mmdit.text import assemble

    n = cfg.train.val_sigmas
    sigmas = [(i + 0.5) / n for i in range(n)]
    per_sigma = [0.0] * n
    for b, batch in enumerate(batches):
        x0 = batch["latent"].float().to(device)
        B = x0.shape[0]
        context, pooled = assemble(layout, B, clip_l=(batch["clip_l"], batch["clip_l_pooled"]),
                                   clip_g=(batch["clip_g"], batch["clip_g_pooled"]), t5=batch.get("t5"),
                                   device=device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + b)).to(device)
        for i, s in enumerate(sigmas):
            sigma = torch.full((B,), s, device=device)
            pred = model(flow.interpolate(x0, noise, sigma), sigma, context, pooled)
            per_sigma[i] += flow.flow_loss(pred, x0, noise, sigma).item() / len(batches)
    return {"mean": sum(per_sigma) / n, "per_sigma": dict(zip([round(s, 4) for s in sigmas], per_sigma))}


@dataclass
class Processes:
    """How this launch trains (set_up_processes): every phase after it reads these."""
    engine: str                 # single | ddp | deepspeed
    rank: int
    world: int
    device: object
    precision: str              # fp32 | bf16
    accelerator: object = None  # accelerate's Accelerator for ddp and deepspeed
    zero_stage: int | None = None
    deepspeed_file: str | None = None

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed"

    def record(self) -> dict:
        return {"engine": self.engine, "zero_stage": self.zero_stage, "deepspeed_config": self.deepspeed_file,
                "world_size": self.world, "precision": self.precision, "device": str(self.device)}


@dataclass
class TrainState:
    """Everything a step changes and a checkpoint holds (build_state)."""
    model: object               # what the step calls: the module, or DDP's / DeepSpeed's wrapper of it
    raw_model: object           # the MMDiT itself
    ema: object                 # fp32, whole on every rank
    optimizer: object
    generator: object           # sigmas, noise and encoder dropout: one stream per rank
    fixed: dict | None          # set when the EMA and checkpoints read DeepSpeed's fp32 masters (see master_weights)
    step: int = 0
    data: object = None         # mmdit.loader.DataPosition: epoch, batches per loader stream, whose turn is next
    tally: object = None        # mmdit.loader.ReadTally: shards that failed, samples skipped
    budget: dict | None = None  # what train.time_budget_s decided, and for which recipe (fit_to_budget)
    align: object = None        # mmdit.align.Alignment when align.weight > 0: REPA's projector and its optimizer


def check_shares(sources, cfg, world: int):
    """Where the manifests give counts: every rank's loader streams must make at least one batch in the first
    epoch (a rank with none would stop while the others wait for it)."""
    from mmdit.loader import epoch_shards

    if any(s.counts is None for s in sources):
        return
    streams = max(1, cfg.data.num_workers)
    per_stream = [0] * (world * streams)
    for i, (_, count) in enumerate(epoch_shards(sources, cfg.train.seed, 0)):
        per_stream[i % len(per_stream)] += count
    for rank in range(world):
        most = max(per_stream[rank * streams:(rank + 1) * streams])
        if most < cfg.data.batch_size:
            shards = sum(len(s.urls) for s in sources)
            raise ValueError(f"epoch 0 gives rank {rank} no batch: its loader streams hold at most {most} samples "
                             f"and data.batch_size is {cfg.data.batch_size}; give more shards than ranks x loader "
                             f"workers ({shards} shards for {world} x {streams}) or a smaller batch")


def check_alignment(cfg, world: int):
    """ValueError unless align.* can run: eager, without DeepSpeed's fp16 loss scaling, a block the preset has (a
    model from init_from is checked once loaded, in build_state), a readable encoder folder (read after
    data.prepare, which may bring it)."""
    from mmdit.align import load_encoder

    if cfg.train.compile:   # the kept block output is a forward hook's side effect, which a compiled graph skips
        raise ValueError("align.weight > 0 runs eager: set train.compile=false (or align.weight=0)")
    engine, deepspeed_file = choose_engine(cfg.train.deepspeed, world, os.environ)
    if engine == "deepspeed" and deepspeed_file:
        # DeepSpeed scales an fp16 loss inside its engine; the projector, outside it, would step on scaled gradients
        try:
            fp16 = json.loads(Path(deepspeed_file).read_text()).get("fp16", {}).get("enabled", False)
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"DeepSpeed config {deepspeed_file} is not a readable JSON object ({e})") from None
        if str(fp16).lower() == "true":   # DeepSpeed takes the string too
            raise ValueError(f"align.weight > 0 trains its projector outside DeepSpeed, which cannot unscale an "
                             f"fp16 loss: {deepspeed_file} enables fp16; use bf16 or fp32 (or align.weight=0)")
    depth = cfg.model.build_config().depth
    if not cfg.model.init_from and cfg.align.block >= depth:
        raise ValueError(f"align.block must be a joint block of the model, 0 to {depth - 1}; got {cfg.align.block}")
    try:
        load_encoder(cfg.align.encoder)
    except FileNotFoundError as e:
        toy = cfg.data.prepare == "mmdit.toy.prepare"
        hint = ("; a toy world made before the alignment encoder has none: python3 data/make_toy.py align "
                "WORLD/pipeline --images WORLD/images/train makes it") if toy else ""
        raise ValueError(f"{e}{hint}") from None


def check_recipe(args):
    """The recipe, its shards (made first when data.prepare says how) and the checkpoint to resume from: every
    error here, as one line, before any compute."""
    from mmdit.config import load_config
    from mmdit.sources import missing_local, names_folder, parse_sources, unreachable

    try:
        cfg = load_config(args.config, args.overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.optim.optimizer != "adamw" and choose_engine(cfg.train.deepspeed, world, os.environ)[0] == "deepspeed":
            raise ValueError(f"optim.optimizer {cfg.optim.optimizer}: DeepSpeed steps its own AdamW; accepted with "
                             f"DeepSpeed: adamw")
        prepare = preparation_step(cfg.data.prepare) if cfg.data.prepare else None
        missing = [s for s in (cfg.data.shards, cfg.data.val_shards)
                   if s and names_folder(s) and not (Path(s) / "manifest.json").is_file()]
        if prepare and missing:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(f"data.prepare ({cfg.data.prepare}) runs in one process: run `python3 train.py` "
                                 f"with this recipe once first")
            import torch

            prepare(cfg.data.shards, cfg.data.val_shards, cfg.data.prepare_args,
                    torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        check_prepared = getattr(importlib.import_module(cfg.data.prepare), "check", None) if prepare else None
        if callable(check_prepared):   # shards that are there may still be stale (mmdit.toy.prepare: an older world)
            check_prepared(cfg.data.shards, cfg.data.val_shards, cfg.data.prepare_args)
        if not cfg.data.shards:
            raise ValueError("data.shards is empty: give a shard folder (with manifest.json), a manifest, a pattern "
                             "or URL, e.g. data.shards=shards/train or data.shards='shards/{00000..00009}.tar'")
        timeout = cfg.data.timeout
        checked = [parse_sources(cfg.data.shards, timeout)] + \
            ([parse_sources(cfg.data.val_shards, timeout)] if cfg.data.val_shards else [])
        parse_sources([s for sources in checked for s in sources])   # train and val shards: one encoder set
        if not cfg.data.resampled:
            check_shares(checked[0], cfg, int(os.environ.get("WORLD_SIZE", "1")))
        for sources in checked:
            absent = missing_local(sources)
            if absent:   # an epoch of what is left would silently train on less
                raise ValueError(f"{len(absent)} local shards that the recipe names are missing: "
                                 f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
            for source in sources:
                problem = unreachable(source, timeout=cfg.data.timeout)
                if problem:
                    raise ValueError(f"shard source {source.spec} cannot be read: {problem}")
        if cfg.train.sample_model:   # its sampling defaults are read at the first sample grid: check them now
            from mmdit.sampling_cli import sampling_defaults

            sampling_defaults(cfg.train.sample_model)
        if cfg.align.weight > 0:
            check_alignment(cfg, world)
    except ValueError as e:   # UsageError is one
        fail(str(e))
    out_dir = Path(cfg.train.out_dir)
    if args.resume == "latest":
        resume = latest_checkpoint(out_dir)
        if resume is None:
            fail(f"--resume latest: no complete checkpoint in {out_dir / 'checkpoints'}")
    elif args.resume:
        resume = Path(args.resume)
        problem = checkpoint_problem(resume)
        if problem:
            fail(f"--resume {resume}: cannot resume from it: {problem}")
    else:
        resume = None
    return cfg, resume


def set_up_processes(cfg, resume) -> Processes:
    """One process, or several under accelerate launch: DeepSpeed ZeRO or DDP (choose_engine), and the precision."""
    import torch

    from mmdit.precision import bf16_speedup, choose_precision

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        engine, deepspeed_file = choose_engine(cfg.train.deepspeed, world, os.environ)
    except ValueError as e:
        fail(str(e))
    # auto measures bf16 against fp32 here; ranks must agree, so several CPU processes (a test setup) take fp32;
    # a resumed run keeps the precision its checkpoint recorded, so the rest of the run computes as the start did
    saved = torch.load(resume / "state_rank0.pt", weights_only=True) if resume else {}
    saved_by = len(list(resume.glob("state_rank*.pt"))) if resume else world
    if saved_by != world:   # each rank resumes its own data position and generators
        fail(f"--resume {resume}: saved by {saved_by} process{'es' if saved_by > 1 else ''}; resume it with "
             f"{saved_by}, not {world}")
    trained_with = saved.get("optimizer", "adamw")   # runs from before optim.optimizer trained with AdamW
    if resume and trained_with != cfg.optim.optimizer:
        fail(f"--resume {resume}: the run was trained with optim.optimizer={trained_with}, the recipe says "
             f"{cfg.optim.optimizer}; resume with the optimizer it was trained with")
    recorded = saved.get("precision")
    precision = recorded if cfg.train.precision == "auto" and recorded else choose_precision(
        cfg.train.precision, "cuda" if torch.cuda.is_available() else "cpu",
        speedup=(lambda device: 0.0) if world > 1 else bf16_speedup)
    if engine == "single":
        return Processes(engine, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), precision)
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = zero_stage = None
    if engine == "deepspeed":
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_file) if deepspeed_file else DeepSpeedPlugin()
        # The batch size and clipping live in the recipe alone; the DeepSpeed file leaves them "auto".
        plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=cfg.data.batch_size,
                                       gradient_accumulation_steps=cfg.optim.grad_accum,
                                       gradient_clipping=cfg.optim.grad_clip)
        zero_stage = plugin.deepspeed_config["zero_optimization"]["stage"]
    # Without a named backend, accelerate on a machine with no GPU takes DeepSpeed's process group for "no
    # backend" and reports num_processes == 1 and process_index 0 on every rank, while torch.distributed
    # has world_size ranks: every rank then reads rank 0's data. Naming it (gloo on CPU) avoids that.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Under DDP the loop's own autocast is the mixed precision; DeepSpeed must know, to keep fp32 masters.
    # Without GPUs accelerate runs DDP only when told it is on the CPU (else it reports no distribution at all).
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)],
                              mixed_precision="bf16" if precision == "bf16" and plugin else "no",
                              gradient_accumulation_steps=cfg.optim.grad_accum,
                              cpu=engine == "ddp" and not torch.cuda.is_available())
    if accelerator.num_processes != world or accelerator.distributed_type.value == "NO":
        fail(f"accelerate sees {accelerator.num_processes} processes ({accelerator.distributed_type.value}) but "
             f"WORLD_SIZE is {world}")
    return Processes(engine, accelerator.process_index, world, accelerator.device, precision, accelerator,
                     zero_stage, deepspeed_file)


def lora_resume_problem(cfg, resume: Path) -> str | None:
    """Why this recipe cannot continue that checkpoint's adapters (or its full weights), as one line, or None: the
    adapters' rank, alpha, targets and base must be the ones they were trained with."""
    from mmdit.lora import lora_record

    saved = resume / "ema_lora.safetensors"
    spec = cfg.model.lora_spec()
    if spec is None:
        return ("it is a LoRA run's checkpoint (adapters only): resume with its model.lora"
                if saved.is_file() else None)
    if not saved.is_file():
        return "it holds full weights, not a LoRA run's adapters: resume it without model.lora"
    record = lora_record(saved)
    now = {"rank": spec.rank, "alpha": spec.lora_alpha,
           "targets": list(spec.targets)}
    for key, value in now.items():
        if record.get(key) != value:
            return f"its adapters have {key} {record.get(key)!r}, the recipe {value!r}: resume with model.lora as saved"
    if record.get("base_sha256") and lora_file_metadata(cfg)["ss_base_model_sha256"] != record["base_sha256"]:
        return (f"model.init_from {cfg.model.init_from} is not the base its adapters were trained on (sha256 "
                f"{record['base_sha256'][:12]})")
    return None


def base_dtype(cfg, procs: Processes):
    """The dtype model.init_from is loaded in: fp32, except a LoRA run in bf16 without DeepSpeed, whose frozen base
    needs no fp32 master (half the memory: SD3.5 Large's base is then 16 GB, not 32)."""
    import torch

    bf16_base = bool(cfg.model.lora) and procs.precision == "bf16" and procs.world == 1
    return torch.bfloat16 if bf16_base else torch.float32


def build_state(cfg, procs: Processes, resume) -> TrainState:
    """The model (fresh or model.init_from), its fp32 EMA, optimizer and training RNG, restored from `resume`."""
    import torch

    from mmdit.checkpoint import load_mmdit
    from mmdit.loader import DataPosition, ReadTally
    from mmdit.lora import add_lora, load_lora_state, lora_twin
    from mmdit.model import MMDiT
    from mmdit.optim import build_optimizer

    torch.manual_seed(cfg.train.seed)
    spec = cfg.model.lora_spec()
    model = (load_mmdit(cfg.model.init_from, dtype=base_dtype(cfg, procs)) if cfg.model.init_from
             else MMDiT(cfg.model.build_config())).to(procs.device)
    model.activation_checkpointing = cfg.model.activation_checkpointing
    if spec is not None:   # only the adapters train (in fp32); the EMA shares the frozen base and averages them
        add_lora(model, spec)
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()
    if cfg.train.compile:   # in place: the module, its parameters and their names stay what checkpoints hold
        model.compile()
    if spec is not None:
        ema = lora_twin(model)
    else:
        ema = MMDiT(model.config).to(procs.device).requires_grad_(False)  # fp32 whatever the training precision
        ema.load_state_dict(model.state_dict())
    # The fused kernel (CPU and CUDA) is much faster than the per-tensor loop; DeepSpeed keeps its own step path.
    optimizer = build_optimizer(cfg.optim.optimizer, [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
                                eps=cfg.optim.eps, fused=not procs.deepspeed,
                                ns_dtype=torch.bfloat16 if procs.precision == "bf16" else torch.float32)
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + procs.rank)
    if resume is not None:
        problem = lora_resume_problem(cfg, resume)
        if problem:
            fail(f"--resume {resume}: {problem}")
    if resume is not None and spec is not None:
        from safetensors.torch import load_file

        load_lora_state(model, load_file(resume / "lora.safetensors"))
        load_lora_state(ema, load_file(resume / "ema_lora.safetensors"))
    elif resume is not None:
        model.load_state_dict(load_mmdit(resume / "model.safetensors").state_dict())
        ema.load_state_dict(load_mmdit(resume / "ema.safetensors").state_dict())
    if resume is not None and not procs.deepspeed:
        optimizer.load_state_dict(torch.load(resume / "optimizer.pt", weights_only=True))
    raw_model, accelerator = model, procs.accelerator
    fixed = None
    if procs.deepspeed and (procs.precision == "bf16" or procs.zero_stage == 3):   # before DeepSpeed casts or splits
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        fixed = {} if spec is not None else \
            {name: t.detach().clone() for name, t in model.state_dict().items() if name not in trained}
    if procs.deepspeed:
        model, optimizer = accelerator.prepare(model, optimizer)
        if resume is not None:
            model.load_checkpoint(str(resume / "deepspeed"), tag="state", load_module_strict=spec is None)  # LoRA: no base inside
    elif accelerator is not None:   # DDP: the model wrapped, the optimizer stays ours (fused, one reduced gradient)
        model = accelerator.prepare_model(model)
    streams = max(1, cfg.data.num_workers)
    state = TrainState(model, raw_model, ema, optimizer, generator, fixed, 0, DataPosition.start(streams), ReadTally())
    if cfg.align.weight > 0:   # the recipe's side was checked in check_alignment; here, the model's
        from mmdit.align import Alignment, load_encoder

        encoder = load_encoder(cfg.align.encoder).to(procs.device)
        if encoder.config["latent_channels"] != raw_model.config.in_channels:
            fail(f"align.encoder {cfg.align.encoder} reads {encoder.config['latent_channels']}-channel latents; the "
                 f"model's are {raw_model.config.in_channels}")
        try:
            state.align = Alignment(raw_model, encoder, block=cfg.align.block, weight=cfg.align.weight,
                                    projector_width=cfg.align.projector_width, betas=cfg.optim.betas,
                                    eps=cfg.optim.eps)
        except ValueError as e:   # a block the model (from init_from) does not have
            fail(str(e))
        if procs.world > 1:   # one projector on every rank, as DDP and DeepSpeed start one model: rank 0's
            from accelerate.utils import broadcast

            for tensor in state.align.projector.state_dict().values():
                tensor.copy_(broadcast(tensor, from_process=0))
    if resume is not None:
        saved = torch.load(resume / f"state_rank{procs.rank}.pt", weights_only=True)
        generator.set_state(saved["generator"])
        if "torch_rng" in saved:
            torch.set_rng_state(saved["torch_rng"])
        state.step = saved["step"]
        state.budget = saved.get("budget")
        if (state.align is not None) != ("align" in saved):
            as_trained = "align.weight=0" if state.align is not None else "its align.* settings"
            fail(f"--resume {resume}: the run was trained with{'out' if state.align is not None else ''} "
                 f"alignment; resume it as it was trained ({as_trained})")
        if state.align is not None:
            problem = state.align.resume_problem(saved["align"])
            if problem:
                fail(f"--resume {resume}: {problem}; resume it as it was trained")
            state.align.load_state_dict(saved["align"])
        if "data" in saved:
            state.data, state.tally = DataPosition.from_dict(saved["data"]), ReadTally(saved.get("read"))
        else:   # saved before loader streams were tracked: a batch count, exact while no stream has ended
            state.data = DataPosition.from_batch_count(saved["epoch"], saved["batches_in_epoch"], streams)
        if len(state.data.consumed) != streams:
            saved_workers = len(state.data.consumed) if len(state.data.consumed) > 1 else "0 or 1"
            fail(f"{resume} was saved reading with data.num_workers {saved_workers}; resume with that (the data "
                 f"position is kept per loader stream), not {cfg.data.num_workers}")
    return state


def checkpoint(cfg, procs: Processes, state: TrainState) -> Path:
    """A checkpoint of the state (collective: every rank calls it at the same step)."""
    import torch

    # torch's global generator drives LoRA dropout (peft's), so it is saved too
    saved = {"step": state.step, "data": state.data.to_dict(), "read": state.tally.to_dict(),
             "generator": state.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "precision": procs.precision, "optimizer": cfg.optim.optimizer}
    if state.budget is not None:
        saved["budget"] = state.budget
    if state.align is not None:
        saved["align"] = state.align.state_dict()
    lora = bool(cfg.model.lora)   # checked once, at load (ModelSection.lora_spec)
    return save_checkpoint(Path(cfg.train.out_dir), state.step, state.model,
                           master_weights(state.raw_model, state.fixed, trained_only=lora), state.ema, state.optimizer,
                           saved, cfg.train.keep_checkpoints, procs.accelerator, procs.deepspeed,
                           lora_file_metadata(cfg) if lora and procs.rank == 0 else None,
                           lora_run=lora)


def lora_file_metadata(cfg) -> dict:
    """A LoRA run's file metadata: rank, alpha, targets, the base's sha256 (read once) and the recipe."""
    from mmdit.config import config_to_dict
    from mmdit.loading import weights_digest
    from mmdit.lora import lora_metadata

    if cfg.model.init_from not in _BASE_DIGESTS:
        _BASE_DIGESTS[cfg.model.init_from] = weights_digest(cfg.model.init_from)
    return lora_metadata(cfg.model.lora_spec(), _BASE_DIGESTS[cfg.model.init_from], config_to_dict(cfg))


_BASE_DIGESTS: dict = {}


def read_policy(cfg):
    from mmdit.sources import ReadPolicy

    return ReadPolicy(retries=cfg.data.retries, retry_delay=cfg.data.retry_delay, timeout=cfg.data.timeout)


def epoch_batches(cfg, procs: Processes, position, sources):
    """This rank's batches of position's epoch, those already trained on left out (mmdit.loader); sources: the
    recipe's data.shards, parsed once at the start."""
    import torch

    from mmdit.loader import ShardDataset

    dataset = ShardDataset(sources, cfg.data.batch_size, seed=cfg.train.seed, epoch=position.epoch,
                           rank=procs.rank, world_size=procs.world, shuffle_buffer=cfg.data.shuffle_buffer,
                           resampled=cfg.data.resampled, variant_probs=list(cfg.data.caption_variant_probs),
                           position=position, policy=read_policy(cfg), end_markers=True)
    # Its own generator: a DataLoader draws a base seed from torch's global one, which LoRA dropout uses, and a
    # resume builds its loader at another moment than the run it continues (the dataset itself uses no torch RNG)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers,
                                            generator=torch.Generator().manual_seed(position.epoch)))


def validation_batches(cfg, procs: Processes) -> list:
    """The fixed validation set: the first 4 batches of data.val_shards, read in order. None at all stops the run;
    shards that failed are said, since the set then differs from a run that read them. Every rank reads it, and
    with several they keep as many batches as the rank that read fewest: under ZeRO-3 all of them run the
    validation forwards together (the parameters are gathered collectively), and a shard that failed on one rank
    alone (a remote read) sent its partners into forwards it never joined: the run aborted."""
    import torch

    from mmdit.loader import ShardDataset

    batches, report = [], None
    for batch in ShardDataset(cfg.data.val_shards, cfg.data.batch_size, seed=0, shuffle_buffer=1,
                              policy=read_policy(cfg)):
        batches.append(batch)
        report = batch["read"]
        if len(batches) == 4:
            break
    read = len(batches)
    if procs.world > 1:   # accelerate's reduce has no "min": the largest negated count
        fewest = -int(procs.accelerator.reduce(torch.tensor(-float(read), device=procs.device), "max"))
        batches = batches[:fewest]
    if not batches:   # on every rank alike, after the agreement: one rank leaving alone would strand the others
        fail(f"data.val_shards {cfg.data.val_shards} gave no batch of data.batch_size {cfg.data.batch_size} "
             f"{'on some rank ' if read else ''}(shards unreadable, or too few samples); fix them, or leave "
             f"data.val_shards empty")
    if report["failed_shards"] or report["corrupt_samples"]:
        print(f"warning: validation shards{f' (rank {procs.rank})' if procs.world > 1 else ''}: "
              f"{report['failed_shards']} failed ({', '.join(report['failed'])}), {report['corrupt_samples']} "
              f"samples skipped; this run's validation set differs from one that read them", file=sys.stderr)
    if len(batches) < read:
        print(f"warning: validation on {len(batches)} batches, not {read}: another rank read no more",
              file=sys.stderr)
    return batches


def export(cfg, state: TrainState, run_started: float):
    """The EMA weights in every format save_mmdit writes, and a whole pipeline when train.sample_model is one."""
    import torch

    from mmdit.checkpoint import save_mmdit

    ema, out = state.ema, Path(cfg.train.out_dir) / "export"
    spec = cfg.model.lora_spec()
    if spec is not None:   # the EMA adapters in the three LoRA layouts, and merged into the base as a whole model
        from mmdit.lora import merged_model, save_lora_files, trained_lora

        from mmdit.checkpoint import load_mmdit

        adapters = trained_lora(ema)
        save_lora_files(adapters, ema.config, spec, out, lora_file_metadata(cfg))
        # merged into the base as stored (fp32), not into a bf16 copy a bf16 LoRA run trained on
        ema = merged_model(load_mmdit(cfg.model.init_from, dtype=torch.float32), adapters, spec)
    save_mmdit(ema, out / "ema.safetensors", "native")
    save_mmdit(ema, out / "ema_sai.safetensors", "sai")
    if ema.config.frequency_dim == 256 and ema.config.mlp_ratio == 4.0:
        save_mmdit(ema, out / "transformer", "diffusers")
        base = Path(cfg.train.sample_model or "")
        if cfg.train.sample_model and (base / "model_index.json").is_file():   # a whole model for sample.py
            export_pipeline(out / "transformer", base, out / "pipeline", ema.config.depth)
    print(f"exported the EMA weights to {out} ({time.perf_counter() - run_started:.0f} s since start)",
          file=sys.stderr)


def budget_applies(cfg, budget: dict | None) -> bool:
    """Whether a decision of train.time_budget_s was made for this recipe: its length, cool-down and budget."""
    return (budget is not None and cfg.train.time_budget_s > 0
            and (budget["asked"], budget.get("asked_cooldown"), budget.get("budget_s"))
            == (cfg.train.steps, cfg.optim.cooldown_steps, cfg.train.time_budget_s))


def with_budget(cfg, budget: dict):
    """The recipe with what train.time_budget_s decided."""
    return replace(cfg, train=replace(cfg.train, steps=budget["steps"]),
                   optim=replace(cfg.optim, cooldown_steps=budget["cooldown_steps"]))


def fit_to_budget(cfg, procs: Processes, state: TrainState, elapsed_s: float, step_s: float, out_dir: Path):
    """Decide, once, how many steps fit train.time_budget_s (every rank alike: the slowest rank's figures), keep
    the decision in the state (checkpoints carry it, so a resume keeps it) and in config.json; the new recipe."""
    import torch

    if procs.accelerator is not None:   # gathered, not reduced: older accelerate sums whatever reduction is named
        figures = procs.accelerator.gather(torch.tensor([[elapsed_s, step_s]], dtype=torch.float64,
                                                        device=procs.device))
        elapsed_s, step_s = figures.max(dim=0).values.tolist()
    steps, cooldown = budgeted_schedule(cfg.train.steps, cfg.optim.cooldown_steps, state.step, elapsed_s, step_s,
                                        cfg.train.time_budget_s)
    state.budget = {"asked": cfg.train.steps, "asked_cooldown": cfg.optim.cooldown_steps,
                    "budget_s": cfg.train.time_budget_s, "steps": steps, "cooldown_steps": cooldown}
    if procs.rank == 0:
        verdict = ("all fit" if steps == cfg.train.steps else
                   f"training {steps} (cool-down {cooldown} of them), not {cfg.train.steps}")
        print(f"time budget {cfg.train.time_budget_s:g} s: {step_s:.3f} s a step, {elapsed_s:.0f} s spent by step "
              f"{state.step}; {verdict}", file=sys.stderr)
        if steps != cfg.train.steps:   # the run folder says what ran
            recipe = json.loads((out_dir / "config.json").read_text())
            recipe["train"]["steps"], recipe["optim"]["cooldown_steps"] = steps, cooldown
            (out_dir / "config.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return with_budget(cfg, state.budget)


def budget_window(cfg, first_step: int) -> tuple[int, int]:
    """The steps after which a budgeted launch starting at first_step starts its clock and decides: the recipe's
    probe (budget_probe_steps), or as many steps after a resume that came later (all ranks resume alike)."""
    start, probe = budget_probe_steps(cfg.train.steps)
    decide = max(probe, first_step + 1 + probe - start)
    return decide - (probe - start), decide


def announce(cfg, procs: Processes) -> Path:
    """Rank 0 says how this launch trains and writes it into the run folder: config.json (the recipe again, naming
    the DeepSpeed file that ran) and run.json (engine, ZeRO stage, world size, precision, device)."""
    import torch

    from mmdit.config import config_to_dict

    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if procs.rank == 0:
        device = procs.device
        hardware = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name()
        stage = f" ZeRO-{procs.zero_stage} ({procs.deepspeed_file or 'the launcher flags'})" if procs.deepspeed else ""
        print(f"engine: {procs.engine}{stage}, {procs.world} process{'es' if procs.world > 1 else ''}; precision: "
              f"{procs.precision} (train.precision {cfg.train.precision}; {device.type}, {hardware})", file=sys.stderr)
        recipe = config_to_dict(cfg)
        recipe["train"]["deepspeed"] = procs.deepspeed_file or ("" if procs.engine == "ddp" else cfg.train.deepspeed)
        (out_dir / "config.json").write_text(json.dumps(recipe, indent=2) + "\n")
        (out_dir / "run.json").write_text(json.dumps(procs.record(), indent=2) + "\n")
    return out_dir


def optimizer_step(cfg, procs: Processes, state: TrainState):
    """Clip, step and zero the accumulated gradients, then update the EMA from the (fp32) weights; the gradient
    norm. DeepSpeed clips and steps itself at the accumulation boundary."""
    import torch

    model, optimizer = state.model, state.optimizer
    if procs.deepspeed:
        optimizer.step()
        optimizer.zero_grad()
        grad_norm = torch.tensor(model.get_global_grad_norm() or 0.0)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    update_ema(state.ema, master_weights(state.raw_model, state.fixed, trained_only=bool(cfg.model.lora)),
               cfg.train.ema_decay)
    state.step += 1
    return grad_norm


def throughput(config, samples_per_s: float, image_tokens: int, text_tokens: int) -> dict:
    """Samples, tokens (image and text) and matmul FLOPs per second of training at samples_per_s."""
    from mmdit.model import train_step_flops

    return {"samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * (image_tokens + text_tokens),
            "flops_per_s": train_step_flops(config, 1, image_tokens, text_tokens) * samples_per_s}


def open_logs(cfg, procs: Processes, state: TrainState, out_dir: Path):
    """This rank's log.jsonl (log_rankN.jsonl off rank 0); TensorBoard and the progress bar on rank 0."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    log = open(out_dir / ("log.jsonl" if procs.rank == 0 else f"log_rank{procs.rank}.jsonl"), "a")
    board = SummaryWriter(out_dir / "tensorboard") if procs.rank == 0 else None
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", disable=procs.rank != 0 or None)
    return log, board, progress


TRAIN_SCALARS = ("loss", "align_loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "flops_per_s",
                 "data")   # TensorBoard train/*, and data/* (the reading's counts)
VAL_SCALARS = ("val", "val_ema")   # validation losses: NAME/mean and NAME/sigma_S


def write_record(record: dict, log, board, progress, step: int, scalars: tuple[str, ...]):
    """One line of log.jsonl (and the console); the record's named scalars to TensorBoard (rank 0's board)."""
    progress.write(json.dumps({k: v for k, v in record.items() if k != "keys"}))
    log.write(json.dumps(record) + "\n")
    log.flush()
    if board is None:
        return
    for name in scalars:
        if name not in record:   # an optional one (align_loss without alignment)
            continue
        value = record[name]
        if name == "data":   # the reading's counts: data/failed_shards, data/corrupt_samples, ...
            for count, v in value.items():
                board.add_scalar(f"data/{count}", v, step)
        elif isinstance(value, dict):   # a validation loss: its mean and per-sigma values
            board.add_scalar(f"{name}/mean", value["mean"], step)
            for sigma, v in value["per_sigma"].items():
                board.add_scalar(f"{name}/sigma_{sigma}", v, step)
        else:
            board.add_scalar(f"train/{name}", value, step)


def evaluate(cfg, procs: Processes, state: TrainState, val_batches, layout, conditioning, no_t5: bool,
             latent_side: int, logs):
    """The validation loss (of the model and of its EMA) and the sample grid of the fixed prompts; returns the
    sampling encoders and VAE, loaded on first use. Under ZeRO-3 every rank joins the model's validation (its
    parameters are gathered collectively); the rest runs on rank 0."""
    import torch

    step, device, (log, board, progress) = state.step, procs.device, logs
    # A bf16 base with fp32 adapters (base_dtype) runs under autocast, as it trains; every other model in fp32.
    mixed = torch.autocast(device.type, dtype=torch.bfloat16, enabled=base_dtype(cfg, procs) == torch.bfloat16)
    if val_batches and (procs.rank == 0 or procs.zero_stage == 3):
        state.raw_model.eval()   # LoRA dropout off; the model has no other train-time behaviour
        with mixed:
            val = {"step": step, "val": validation_loss(state.raw_model, val_batches, layout, cfg, device)}
        state.raw_model.train()
        if procs.rank == 0:
            with mixed:
                val["val_ema"] = validation_loss(state.ema, val_batches, layout, cfg, device)   # the EMA is whole
            write_record(val, log, board, progress, step, VAL_SCALARS)
    if cfg.train.sample_model and procs.rank == 0:
        if conditioning is None:
            from mmdit.loading import load_conditioning

            with outside_zero3_init():
                text, vae = load_conditioning(cfg.train.sample_model, no_t5=no_t5, t5_tokens=layout.t5_tokens)
            conditioning = text.to(device), vae.to(device)
        with mixed:
            grid = sample_grid(state.ema, conditioning, cfg, side=latent_side * conditioning[1].downsample)
        board.add_image("samples/ema", grid, step, dataformats="HWC")
        from PIL import Image

        (Path(cfg.train.out_dir) / "samples").mkdir(exist_ok=True)
        Image.fromarray(grid).save(Path(cfg.train.out_dir) / "samples" / f"step_{step:08d}.png")
    return conditioning


def main(argv=None):
    run_started = time.perf_counter()
    args = parse_args(argv)
    cfg, resume = check_recipe(args)

    import torch

    from mmdit import flow
    from mmdit.config import TextLayout
    from mmdit.loader import DataPosition, resampled_epoch_batches
    from mmdit.sources import parse_sources
    from mmdit.text import assemble, sample_keep

    procs = set_up_processes(cfg, resume)
    rank, device, accelerator = procs.rank, procs.device, procs.accelerator
    state = build_state(cfg, procs, resume)
    if budget_applies(cfg, state.budget):
        cfg = with_budget(cfg, state.budget)
    else:   # none yet, or made for another length or budget: this launch decides (budget_window)
        state.budget = None
    out_dir = announce(cfg, procs)   # after the state: a run that cannot start leaves an earlier config.json be
    model, raw_model, optimizer, generator = state.model, state.raw_model, state.optimizer, state.generator
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=procs.precision == "bf16")

    position = state.data
    train_sources = parse_sources(cfg.data.shards, cfg.data.timeout)   # once: a remote manifest is not read again
    batches = epoch_batches(cfg, procs, position, train_sources)
    epoch_length = (resampled_epoch_batches(train_sources, procs.world, cfg.data.batch_size)
                    if cfg.data.resampled else None)   # epoch mode: an epoch ends where its streams do
    val_batches = validation_batches(cfg, procs) if cfg.data.val_shards else []
    layout, conditioning = None, None
    drop = {"clip_l": cfg.text.drop_clip_l, "clip_g": cfg.text.drop_clip_g, "t5": cfg.text.drop_t5}

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stop.update(signal=number))
    log, board, progress = open_logs(cfg, procs, state, out_dir)

    # ---- the loop (a step is grad_accum micro-batches; checkpoints fall between steps) ----
    started, micro, bad_steps, stopping = time.perf_counter(), 0, 0, False
    clock_step, decide_step = budget_window(cfg, state.step)
    clock = None          # when step clock_step ended: a budgeted launch times its steps from there
    while state.step < cfg.train.steps:
        if epoch_length is not None and position.batches >= epoch_length:   # a resampled epoch is a count
            state.tally.end_epoch()
            state.data = position = DataPosition.start(len(position.consumed), position.epoch + 1)
            batches = epoch_batches(cfg, procs, position, train_sources)
        try:
            batch = next(batches)
        except StopIteration:  # end of an epoch: the next one is shuffled anew
            if position.batches == 0:   # (a resume counts the batches it skipped) an empty epoch repeats forever
                fail(f"epoch {position.epoch} gave rank {rank} no batch: data.batch_size {cfg.data.batch_size} is "
                     f"more than its share of the samples in {cfg.data.shards}, or none could be read")
            state.tally.end_epoch()
            state.data = position = DataPosition.start(len(position.consumed), position.epoch + 1)
            batches = epoch_batches(cfg, procs, position, train_sources)
            continue
        except ValueError as e:   # a stream that can yield nothing (mmdit.loader); a loader worker's comes wrapped
            fail(f"data: {str(e).strip().splitlines()[-1].removeprefix('ValueError: ')}")
        failed = state.tally.update(batch["stream"], batch["read"])
        if failed:   # each failed shard named once in the log; the counts go with every train record
            write_record({"step": state.step, "rank": rank, "data_failed": failed}, log, board, progress,
                         state.step, ())
        if batch.get("end"):
            continue
        position.advance(batch["stream"])
        x0 = batch["latent"].float().to(device)
        B = x0.shape[0]
        if layout is None:
            layout = TextLayout(clip_l_dim=batch["clip_l"].shape[-1], clip_g_dim=batch["clip_g"].shape[-1],
                                context_dim=raw_model.config.context_dim, clip_tokens=batch["clip_l"].shape[1],
                                t5_tokens=batch["t5"].shape[1] if "t5" in batch else 77)

        sigma = flow.sample_sigmas(B, cfg.flow.timestep_sampling, mean=cfg.flow.lognorm_mean,
                                   std=cfg.flow.lognorm_std, mode_scale=cfg.flow.mode_scale, generator=generator)
        sigma = flow.shift_sigma(sigma, cfg.flow.train_shift).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        keep = sample_keep(B, drop, generator)
        context, pooled = assemble(layout, B, clip_l=(batch["clip_l"], batch["clip_l_pooled"]),
                                   clip_g=(batch["clip_g"], batch["clip_g_pooled"]), t5=batch.get("t5"),
                                   keep=keep, device=device)

        for group in optimizer.param_groups:
            group["lr"] = get_lr(state.step, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.cooldown_steps,
                                 cfg.train.steps)
        if state.align is not None:
            state.align.output.arm()   # keep this forward's states (not validation's, nor a checkpointed recompute)
        with autocast:
            pred = model(flow.interpolate(x0, noise, sigma), sigma, context, pooled)
        loss = flow.flow_loss(pred, x0, noise, sigma, cfg.flow.loss_weighting)
        objective = loss
        if state.align is not None:
            align_loss = state.align.loss(x0)
            objective = loss + state.align.weight * align_loss
        finite = torch.isfinite(objective.detach())
        if procs.world > 1:   # skipped on every rank or on none: a rank alone in a backward would wait forever
            finite = accelerator.reduce((~finite).to(device, torch.float32), "max") == 0
        if not finite:
            bad_steps += 1
            print(f"step {state.step}: non-finite loss, step skipped ({bad_steps} in a row)", file=sys.stderr)
            if bad_steps >= cfg.train.max_bad_steps:
                fail(f"{bad_steps} non-finite losses in a row; the last good checkpoint is kept in "
                     f"{out_dir / 'checkpoints'}")
            continue
        bad_steps = 0
        if procs.deepspeed:
            # DeepSpeed scales by 1/accumulation, reduces, clips and steps at the boundary, where it is told it is:
            # accelerate's backward outside its accumulate() marks every micro-batch a boundary and steps each one
            boundary = micro + 1 == cfg.optim.grad_accum
            model.set_gradient_accumulation_boundary(boundary)
            model.backward(objective)
            if boundary:
                model.step()
        else:
            (objective / cfg.optim.grad_accum).backward()
        micro += 1
        if micro < cfg.optim.grad_accum:
            continue
        micro = 0
        grad_norm = optimizer_step(cfg, procs, state)
        if state.align is not None:
            if procs.world > 1:   # the projector is outside DDP and DeepSpeed: its gradient is reduced here
                for p in state.align.projector.parameters():
                    p.grad = accelerator.reduce(p.grad, "mean")
            state.align.step(optimizer.param_groups[0]["lr"])
        step = state.step
        progress.update(1)
        if cfg.train.time_budget_s > 0 and state.budget is None:
            if step == clock_step:
                clock = time.perf_counter()
            elif step == decide_step:
                now = time.perf_counter()
                cfg = fit_to_budget(cfg, procs, state, now - run_started, (now - clock) / (step - clock_step),
                                    out_dir)
                progress.total = cfg.train.steps
                progress.refresh()

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            patch = raw_model.config.patch_size
            elapsed, image_tokens = time.perf_counter() - started, (x0.shape[-1] // patch) * (x0.shape[-2] // patch)
            record = {"step": step, "rank": rank, "keys": batch["keys"], "loss": loss.item(),
                      **({"align_loss": align_loss.item()} if state.align is not None else {}),
                      "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
                      **throughput(raw_model.config, B * cfg.optim.grad_accum * cfg.train.log_every / elapsed,
                                   image_tokens, context.shape[1]), "data": state.tally.totals()}
            write_record(record, log, board, progress, step, TRAIN_SCALARS)
            started = time.perf_counter()
        if step % cfg.train.val_every == 0 or step == cfg.train.steps:
            conditioning = evaluate(cfg, procs, state, val_batches, layout, conditioning, "t5" not in batch,
                                    x0.shape[-1], (log, board, progress))
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            checkpoint(cfg, procs, state)
        stopping = stop["signal"] is not None
        if accelerator is not None:  # every rank must stop at the same step: the save is collective
            stopping = bool(accelerator.reduce(torch.tensor(int(stopping), device=device), "max").item())
        if stopping:
            folder = checkpoint(cfg, procs, state)
            print(f"signal {stop['signal']}: saved {folder}, exiting", file=sys.stderr)
            break
    progress.close()
    if board is not None:
        board.close()
    if rank == 0 and not stopping:   # a run stopped by a signal resumes; only a finished one exports
        export(cfg, state, run_started)
    end_together(accelerator)
    return 0


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as e:   # fail(): its line is printed; the exit code still goes through leave
        if not isinstance(e.code, int):
            raise
        exit_code = e.code
    leave(exit_code)

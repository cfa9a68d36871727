"""Pretrain the tiny SD3.5 pipeline on an unlabelled image–caption corpus: the embedded stand-in for the
large-corpus pretraining that SD3.5 brings to the paper's setting.

First the VAE is fitted as an autoencoder (`fit_vae`), then the whole transformer is trained
text-to-image, without masks, with SD3's rectified-flow objective (`crfm.training.objective.flow_matching_loss`,
`use_mask=False`). The text encoders stay as built (frozen, as SD3's are). The shipped transformer weights are an
exponential moving average (diffusers' `EMAModel`), which samples better than the last iterate of a small model.

    python -m crfm.toy.tiny OUT --pretrain_on CORPUS/index.jsonl [--pretrain_steps N] ...

The job is resumable: `OUT` is built once, the VAE fit leaves a marker, and the transformer, EMA, optimizer and
step are checkpointed every `checkpoint_every` steps under the work folder; re-running the same command continues.
Only each item's image and prompt are read from the index, never its label.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crfm.data.dataset import load_index_images
from crfm.data.index import read_index
from crfm.toy.patch_critic import PatchCritic, adaptive_weight, critic_hinge_loss
from crfm.utils.fileio import atomic_path, write_text_atomic
from crfm.utils.flags import resolve_dtype

# The pretrained tiny base shipped with crfm (`scripts/pretrain_base.sh` rebuilds it; model card in its README.md).
SHIPPED_BASE = Path(__file__).resolve().parent / "tiny_sd35_base"

CHECKPOINT = "checkpoint"
VAE_CHECKPOINT = "vae_checkpoint"
LOSS_LOG = "loss.jsonl"
REPORT = "pretrain_report.json"
VAE_MARKER = "vae_fitted.json"
DECODER_MARKER = "vae_decoder_refit.json"
CONTINUED_MARKER = "continued.json"


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 16000
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    lr_schedule: str = "constant"  # after warm-up; cosine decays to 0 over the run (an annealing phase)
    scheduler_shift: float | None = None  # written into the pipeline's scheduler first (None: keep the folder's)
    ema_decay: float = 0.999
    resolution: int = 64
    max_sequence_length: int = 32
    prompt_dropout: float = 0.1
    checkpoint_every: int = 500
    vae_steps: int = 3000
    vae_edge_weight: float = 1.0
    vae_adversarial_weight: float = 0.0  # the patch critic's term (`crfm.toy.patch_critic`); 0: none
    rot90: bool = True  # quarter turns as well as flips: aerial scenes have no up
    mixed_precision: str = "no"  # bf16: autocast, for CPUs with AVX-512 BF16 / AMX (weights and optimizer fp32)
    seed: int = 0

    @classmethod
    def from_record(cls, record: dict) -> PretrainSettings:
        """The settings a report recorded; fields added since it was written take their defaults."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def edge_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the horizontal and vertical pixel differences: a pixel loss alone lets a small VAE
    blur roads, roof edges and crop rows (their error is a few pixels' worth); a gradient term charges lost edges."""
    dx = (recon.diff(dim=-1) - target.diff(dim=-1)).abs().mean()
    dy = (recon.diff(dim=-2) - target.diff(dim=-2)).abs().mean()
    return dx + dy


def _dihedral(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped and quarter-turned at random: aerial scenes have no up, so 8 views of every image."""
    flip = torch.rand(len(batch), generator=gen) < 0.5
    turns = torch.randint(4, (len(batch),), generator=gen).tolist()
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return torch.stack([image.rot90(k, dims=(-2, -1)) for image, k in zip(batch, turns, strict=True)])


def fit_vae(
    pipe_dir: str | Path,
    index_file: str | Path,
    steps: int = 1500,
    size: int = 64,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    edge_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    work_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    decoder_only: bool = False,
    adversarial_weight: float = 0.0,
) -> dict[str, float]:
    """Train the tiny VAE as an autoencoder on a dataset's images, in place, so decoded latents look like images.

    A random VAE decodes anything to noise, which hides whether the MM-DiT learned to follow the mask. The loss is
    L1 + MSE + `edge_weight` x `edge_loss` (+ a tiny KL), the learning rate decays as a cosine to a tenth, and
    every image is seen in its 8 dihedral views. Afterwards `shift_factor`/`scaling_factor` are set from the
    latents' statistics (as SD3's were), so scaled latents have zero mean and unit variance, which flow matching's
    noise assumes. With `work_dir`, the fit is checkpointed every `checkpoint_every` steps and a re-run resumes
    (each step's draws depend only on the seed and the step, so a resumed fit equals an uninterrupted one).

    `decoder_only`: the encoder (hence the latent space, its shift and scale, and every transformer trained on it)
    stays as it is and only the decoder learns, as SD's VAE decoders were fine-tuned after release: sharper images
    from the same latents, no retraining of the MM-DiT.

    `adversarial_weight` > 0 adds the patch critic's term (`crfm.toy.patch_critic`), scaled adaptively against the
    pixel loss; the critic learns alone for the first quarter of the steps (at most 500) before the decoder is
    charged, so that its first verdicts are not noise.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from crfm.training.objective import step_generator

    pipe_dir = Path(pipe_dir)
    images, _ = load_index_images(index_file, size)
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").train()
    if decoder_only:
        vae.requires_grad_(False)
        after = vae.post_quant_conv  # the 1x1 projection between latents and decoder (absent in some configs)
        trained = [*vae.decoder.parameters(), *(after.parameters() if after is not None else [])]
        for parameter in trained:
            parameter.requires_grad_(True)
    else:
        trained = list(vae.parameters())
    optimizer = torch.optim.Adam(trained, lr=learning_rate)
    modules: dict[str, torch.nn.Module] = {"vae.safetensors": vae}
    critic = critic_optimizer = None
    critic_warmup = min(500, steps // 4)
    if adversarial_weight > 0:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            critic = PatchCritic()
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.9))
        modules["critic.safetensors"] = critic

    def cosine(step: int) -> float:  # the learning rate's factor: 1 at the start, a tenth at the end
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    checkpoint = Path(work_dir) / VAE_CHECKPOINT if work_dir is not None else None
    start, _, saved = _load_checkpoint(checkpoint, modules) if checkpoint else (0, 0.0, None)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        if critic_optimizer is not None:
            critic_optimizer.load_state_dict(saved["critic_optimizer"])
        for _ in range(start):  # LambdaLR's state is its step count
            schedule.step()
    bar = tqdm(range(start, steps), desc="fit tiny VAE", unit="step", disable=not progress)
    for step in bar:
        gen = step_generator(seed, 1, step)  # rank 1: draws apart from the transformer's
        batch = _dihedral(images[torch.randint(len(images), (batch_size,), generator=gen)], gen)
        with torch.set_grad_enabled(not decoder_only):
            posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        loss = mse + (recon - batch).abs().mean() + edge_weight * edge_loss(recon, batch)
        if critic is not None and step >= critic_warmup:
            critic.requires_grad_(False)
            fooled = -critic(recon).mean()
            scale = adaptive_weight(loss, fooled, vae.decoder.conv_out.weight)
            loss = loss + adversarial_weight * scale * fooled
            critic.requires_grad_(True)
        if not decoder_only:
            loss = loss + kl_weight * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if critic is not None:
            critic_hinge_loss(critic, batch, recon).backward()
            critic_optimizer.step()
            critic_optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{mse.item():.4f}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            state = {"optimizer": optimizer.state_dict()}
            if critic_optimizer is not None:
                state["critic_optimizer"] = critic_optimizer.state_dict()
            weights = {name: module.state_dict() for name, module in modules.items()}
            _save_checkpoint(checkpoint, weights, state, step + 1, 0.0)
    vae.eval()
    with torch.no_grad():
        # The scaling statistics need every image's latents; a decoder refit keeps the encoder's and needs only the
        # latents of the images it reconstructs.
        encoded = images[:256] if decoder_only else images
        latents = torch.cat([vae.encode(encoded[i : i + 32]).latent_dist.mode() for i in range(0, len(encoded), 32)])
        recon = vae.decode(latents[:256]).sample
        recon_mse = torch.nn.functional.mse_loss(recon, images[:256]).item()
        recon_edge = edge_loss(recon, images[:256]).item()
    if decoder_only:  # the latent space is the encoder's, unchanged
        shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    else:
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(pipe_dir / "vae")
    stats = {"reconstruction_mse": recon_mse, "edge_error": recon_edge, "shift_factor": shift, "scaling_factor": scale}
    return stats | ({"adversarial_weight": adversarial_weight} if adversarial_weight > 0 else {})


@torch.no_grad()
def encode_corpus_prompts(
    pipe_dir: Path, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode each distinct prompt once; returns (embeds [P+1, L, D], pooled [P+1, Dp], prompt id per item).

    Row 0 is the empty prompt (the unconditional branch that prompt dropout trains)."""
    from crfm.data.vectorize import encode_prompts, load_text_encoders

    distinct = ["", *sorted(set(prompts) - {""})]
    row = {p: i for i, p in enumerate(distinct)}
    text = load_text_encoders(pipe_dir)
    embeds, pooled = [], []
    for start in range(0, len(distinct), 64):
        e, p = encode_prompts(text, distinct[start : start + 64], max_sequence_length=max_sequence_length)
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled), torch.tensor([row[p] for p in prompts])


def _save_checkpoint(folder: Path, weights: dict, state: dict, step: int, seconds: float) -> None:
    """Weights as safetensors; optimizer and EMA state (tensors and numbers only) load with weights_only=True. The
    folder is replaced whole, so an interruption leaves the previous checkpoint or the new one, never a mix."""
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, tensors in weights.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
    torch.save(state, tmp / "state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step, "seconds": seconds}) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)


def _load_checkpoint(folder: Path, modules: dict) -> tuple[int, float, dict | None]:
    """`_save_checkpoint`'s folder back: each module's weights loaded in place; (step, seconds, the optimizer and
    EMA state), or (0, 0.0, None) when there is no checkpoint yet."""
    if not (folder / "step.json").is_file():
        return 0, 0.0, None
    record = json.loads((folder / "step.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(str(folder / name)))
    return record["step"], record["seconds"], torch.load(folder / "state.pt", weights_only=True)


def pretrain_transformer(
    pipe_dir: str | Path,
    index_file: str | Path,
    work_dir: str | Path,
    settings: PretrainSettings,
    progress: bool,
    stream: int = 0,
) -> dict:
    """Train `pipe_dir/transformer` text-to-image on the corpus, resumably; writes the EMA weights back into it.
    Phases that train the same weights again use other `stream`s, so they draw other batches and noise."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from crfm.training.objective import FlowMatchingConfig, TrainTimesteps, flow_matching_loss, step_generator

    pipe_dir, work_dir = Path(pipe_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    images, prompts = load_index_images(index_file, settings.resolution)
    embeds, pooled, prompt_ids = encode_corpus_prompts(pipe_dir, prompts, settings.max_sequence_length)
    empty = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").eval().requires_grad_(False)
    transformer = SD3Transformer2DModel.from_pretrained(pipe_dir / "transformer").train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule_name = {"constant": "constant_with_warmup", "cosine": "cosine"}[settings.lr_schedule]
    lr_schedule = get_scheduler(
        schedule_name, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=settings.steps
    )
    ema = EMAModel(transformer.parameters(), decay=settings.ema_decay)
    checkpoint = work_dir / CHECKPOINT
    start, seconds_before, saved = _load_checkpoint(checkpoint, {"transformer.safetensors": transformer})
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        ema.load_state_dict(saved["ema"])
        for _ in range(start):  # LambdaLR's state is its step count
            lr_schedule.step()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pipe_dir / "scheduler")
    if settings.scheduler_shift is not None and scheduler.config.shift != settings.scheduler_shift:
        # The shift moves training draws and sampling steps alike: the folder keeps the one it was trained with.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=settings.scheduler_shift)
        scheduler.save_pretrained(pipe_dir / "scheduler")
    schedule = TrainTimesteps.from_scheduler(scheduler)
    config = FlowMatchingConfig(num_cls=1, prompt_dropout=settings.prompt_dropout, rot90=settings.rot90, use_mask=False)
    dtype = resolve_dtype(settings.mixed_precision)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    loss_log = work_dir / LOSS_LOG
    if loss_log.is_file():  # steps after the checkpoint were lost with the interruption and are redone
        kept = [line for line in loss_log.read_text().splitlines() if json.loads(line)["step"] <= start]
        write_text_atomic(loss_log, "".join(line + "\n" for line in kept))
    log = loss_log.open("a")
    t0 = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc="pretrain tiny transformer", unit="step", disable=not progress)
    for step in bar:
        gen = step_generator(settings.seed, stream, step)  # batch choice and every draw: resumable and repeatable
        pick = torch.randint(len(images), (settings.batch_size,), generator=gen)
        rows = prompt_ids[pick]
        batch = {"image": images[pick], "prompt_embeds": embeds[rows], "pooled_prompt_embeds": pooled[rows]}
        with autocast:
            loss = flow_matching_loss(transformer, vae, batch, gen, config, schedule, empty).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(transformer.parameters())
        log.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5)}) + "\n")
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            log.flush()
            _save_checkpoint(
                checkpoint,
                {"transformer.safetensors": transformer.state_dict()},
                {"optimizer": optimizer.state_dict(), "ema": ema.state_dict()},
                step + 1,
                seconds_before + time.perf_counter() - t0,
            )
    log.close()
    seconds = seconds_before + time.perf_counter() - t0
    ema.copy_to(transformer.parameters())
    transformer.eval().save_pretrained(pipe_dir / "transformer", safe_serialization=True)
    losses = [json.loads(line)["loss"] for line in loss_log.read_text().splitlines()]
    tail = losses[-min(len(losses), 500) :]
    return {
        "transformer_steps": settings.steps,
        "transformer_seconds": round(seconds, 1),
        "first_500_loss": round(sum(losses[:500]) / max(1, len(losses[:500])), 4),
        "last_500_loss": round(sum(tail) / max(1, len(tail)), 4),
        "corpus_images": len(images),
        "distinct_prompts": int(len(embeds) - 1),
    }


@torch.no_grad()
def sample_grid(
    pipe_dir: str | Path,
    prompts: list[str],
    out_png: str | Path,
    resolution: int,
    max_sequence_length: int,
    seed: int = 0,
) -> None:
    """Text-to-image samples of the pretrained pipeline with diffusers' own `StableDiffusion3Pipeline`."""
    from PIL import Image

    from crfm.utils.quiet import sd3_pipeline_module

    StableDiffusion3Pipeline = sd3_pipeline_module().StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    tiles = []
    for i, prompt in enumerate(prompts):
        out = pipe(
            prompt,
            height=resolution,
            width=resolution,
            num_inference_steps=28,
            guidance_scale=1.0,
            max_sequence_length=max_sequence_length,
            generator=torch.Generator().manual_seed(seed + i),
        )
        tiles.append(out.images[0])
    cols = 4
    rows = math.ceil(len(tiles) / cols)
    grid = Image.new("RGB", (cols * resolution, rows * resolution), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * resolution, (i // cols) * resolution))
    with atomic_path(out_png) as tmp:
        grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(tmp)


def _fit_once(marker: Path, fit: Callable[[], dict]) -> dict:
    """`fit()`'s record with its seconds, run once: a finished fit leaves `marker` (its record), which a re-run
    reads back instead of fitting again; an unfinished one resumes from its own checkpoints."""
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record = fit()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        write_text_atomic(marker, json.dumps(record, indent=2) + "\n")
    return json.loads(marker.read_text())


def run_pretraining(
    pipe_dir: str | Path,
    index_file: str | Path,
    work_dir: str | Path,
    settings: PretrainSettings,
    command: str,
    progress: bool = True,
) -> dict:
    """VAE fit (once), transformer pretraining (resumable), sample grid and model card; returns the report."""
    pipe_dir, work_dir = Path(pipe_dir), Path(work_dir)
    if (pipe_dir / REPORT).is_file():
        # Finished with these settings: a re-run (of scripts/pretrain_base.sh) must not write this phase's weights
        # over a later phase's (`continue_pretraining`).
        report = json.loads((pipe_dir / REPORT).read_text())
        if PretrainSettings.from_record(report["settings"]) == settings:
            return report
    vae_stats = _fit_once(
        work_dir / VAE_MARKER,
        lambda: fit_vae(
            pipe_dir,
            index_file,
            steps=settings.vae_steps,
            size=settings.resolution,
            edge_weight=settings.vae_edge_weight,
            adversarial_weight=settings.vae_adversarial_weight,
            seed=settings.seed,
            work_dir=work_dir,
            progress=progress,
        ),
    )
    report = pretrain_transformer(pipe_dir, index_file, work_dir, settings, progress)
    report["vae"] = vae_stats
    report["settings"] = asdict(settings)
    report["command"] = command
    report["corpus"] = _corpus_recipe(Path(index_file))
    # The grid's prompts come from the index alone; the images were loaded (and freed) by pretrain_transformer.
    prompts = [item.prompt for item in read_index(index_file, Path(index_file).parent, check_files=False)]
    grid_prompts = sorted(set(prompts), key=lambda p: (len(p), p))[:: max(1, len(set(prompts)) // 8)][:8]
    sample_grid(pipe_dir, grid_prompts, pipe_dir / "samples.png", settings.resolution, settings.max_sequence_length)
    report["grid_prompts"] = grid_prompts
    write_text_atomic(pipe_dir / REPORT, json.dumps(report, indent=2) + "\n")
    write_model_card(pipe_dir, report)
    return report


def refit_vae_decoder(
    pipe_dir: str | Path,
    index_file: str | Path,
    work_dir: str | Path,
    steps: int,
    edge_weight: float,
    size: int,
    seed: int,
    command: str,
    progress: bool = True,
    adversarial_weight: float = 0.0,
) -> dict:
    """The VAE decoder of a pretrained pipeline fitted again on the corpus (`fit_vae(decoder_only=True)`), resumably;
    the result goes into the pipeline's report (`vae_decoder_refit`) and model card. The encoder, the latent space
    and the transformer are left as they are."""
    pipe_dir, work_dir = Path(pipe_dir), Path(work_dir)
    refit = _fit_once(
        work_dir / DECODER_MARKER,
        lambda: fit_vae(
            pipe_dir, index_file, steps=steps, size=size, edge_weight=edge_weight, seed=seed, progress=progress,
            work_dir=work_dir, decoder_only=True, adversarial_weight=adversarial_weight,
        ) | {"steps": steps, "edge_weight": edge_weight, "command": command},
    )  # fmt: skip
    if (pipe_dir / REPORT).is_file():  # the card's samples decode through the new decoder
        _record_phase(pipe_dir, "vae_decoder_refit", refit, lambda report: _card_samples(pipe_dir, report))
    return refit


def _card_samples(pipe_dir: Path, report: dict) -> None:
    """The model card's sample grid (`samples.png`) drawn again by the pipeline as it now is."""
    settings = report["settings"]
    sample_grid(
        pipe_dir, report["grid_prompts"], pipe_dir / "samples.png", settings["resolution"],
        settings["max_sequence_length"],
    )  # fmt: skip


def shares_latent_space(base: Path, other: Path) -> bool:
    """Whether pipeline `base` differs from `other` at most in its VAE decoder (`refit_vae_decoder`): the same
    transformer, VAE encoder and latent scaling, so a generator fine-tuned on one is exactly what the other would
    train (its images decode through its own decoder)."""
    weights = "diffusion_pytorch_model.safetensors"
    if (base / "transformer" / weights).read_bytes() != (other / "transformer" / weights).read_bytes():
        return False
    ours, theirs = (load_file(str(folder / "vae" / weights)) for folder in (base, other))
    encoder = [k for k in theirs if not k.startswith(("decoder.", "post_quant_conv."))]
    if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in encoder):
        return False
    configs = [json.loads((folder / "vae" / "config.json").read_text()) for folder in (base, other)]
    return all(configs[0][k] == configs[1][k] for k in ("shift_factor", "scaling_factor", "latent_channels"))


def _record_phase(pipe_dir: Path, key: str, record: dict, on_change: Callable[[dict], None] | None = None) -> dict:
    """A later phase's record into the pipeline's report (under `key`) and model card, when it is new there;
    `on_change(report)` first (e.g. new samples). Returns the report."""
    report = json.loads((pipe_dir / REPORT).read_text())
    if report.get(key) != record:
        report[key] = record
        if on_change is not None:
            on_change(report)
        write_text_atomic(pipe_dir / REPORT, json.dumps(report, indent=2) + "\n")
        write_model_card(pipe_dir, report)
    return report


def continued_phases(report: dict) -> list[dict]:
    """The later pretraining phases a report recorded, in order (reports before the third phase held one record)."""
    phases = report.get("continued", [])
    return phases if isinstance(phases, list) else [phases]


def continue_pretraining(
    pipe_dir: str | Path,
    index_file: str | Path,
    work_dir: str | Path,
    settings: PretrainSettings,
    command: str,
    progress: bool = True,
) -> dict:
    """A later phase for the transformer of a pretrained pipeline: `settings.steps` more steps on the corpus from its
    shipped (EMA) weights, with a fresh optimizer, resumably; VAE and text encoders unchanged. Phase k after the
    first draws stream k, so no two phases see the same batches and noise. The phase is appended to the pipeline's
    report (`continued`), samples and model card, once; a finished phase's command run again changes nothing."""
    pipe_dir, work_dir = Path(pipe_dir), Path(work_dir)
    if not (pipe_dir / REPORT).is_file():
        raise FileNotFoundError(f"{pipe_dir} has no {REPORT}: continue a pretrained pipeline (--pretrain_on first)")
    report = json.loads((pipe_dir / REPORT).read_text())
    earlier = continued_phases(report)
    stream = len(earlier) + 1
    phase = _fit_once(
        work_dir / CONTINUED_MARKER,
        lambda: (
            pretrain_transformer(pipe_dir, index_file, work_dir, settings, progress, stream=stream)
            | {"settings": asdict(settings), "stream": stream, "command": command}
        ),
    )
    if phase in earlier:  # training writes the transformer and scheduler, never the report: it is still current
        return report
    return _record_phase(
        pipe_dir, "continued", [*earlier, phase], lambda report: _card_samples(pipe_dir, report)
    )  # fmt: skip


def _corpus_recipe(index_file: Path) -> dict:
    """The toydata settings of the corpus and the command that redraws it, when the corpus recorded them."""
    from crfm.toy.toydata import RECIPE_FILE

    path = index_file.parent / RECIPE_FILE
    if not path.is_file():
        return {"command": f"(corpus {index_file} did not record how it was made)"}
    recipe = json.loads(path.read_text())
    flags = (
        f"--num {recipe['num']} --size {recipe['size']} --seed {recipe['seed']} --ignore_prob {recipe['ignore_prob']}"
    )
    return {**recipe, "command": f"python -m crfm.toy.toydata {index_file.parent} {flags}"}


def adversarial_words(fit: dict) -> str:
    """The model card's words on a VAE fit's patch-critic term, or nothing when it had none."""
    weight = fit.get("adversarial_weight", 0)
    return f" + {weight} x the patch critic's adaptive adversarial term" if weight else ""


def decoder_line(report: dict) -> str:
    """The model card's words on a decoder refit (`refit_vae_decoder`), or nothing."""
    refit = report.get("vae_decoder_refit")
    if refit is None:
        return ""
    return (
        f" Then the decoder alone (encoder, latent space and transformer unchanged) fitted again, {refit['steps']} "
        f"steps, L1 + MSE + {refit['edge_weight']} x image-gradient error{adversarial_words(refit)}, "
        f"{refit['seconds']} s: reconstruction MSE {refit['reconstruction_mse']:.4f}, gradient error "
        f"{refit['edge_error']:.4f}."
    )


ORDINALS = ("second", "third", "fourth", "fifth", "sixth")


def continued_line(report: dict) -> str:
    """The model card's words on the later pretraining phases (`continue_pretraining`), or nothing."""
    lines = []
    for number, phase in enumerate(continued_phases(report)):
        settings = phase["settings"]
        shifted = settings.get("scheduler_shift")
        shift = "" if shifted is None else f", the scheduler's shift set to {shifted} (training draws and sampling)"
        ordinal = ORDINALS[number] if number < len(ORDINALS) else f"{number + 2}th"
        lines.append(
            f" Then a {ordinal} phase from those EMA weights (`continue_pretraining`): {phase['transformer_steps']} "
            f"more steps, fresh AdamW, lr {settings['learning_rate']} ({settings['warmup_steps']} warm-up steps, then "
            f"{settings['lr_schedule']}), batch {settings['batch_size']}, other draws, "
            f"{phase['transformer_seconds']:.0f} s{shift}; mean loss {phase['first_500_loss']} over its first 500 "
            f"steps, {phase['last_500_loss']} over its last 500; its EMA weights (decay {settings['ema_decay']}) "
            "shipped."
        )
    return "".join(lines)


def write_model_card(pipe_dir: Path, report: dict) -> None:
    settings, vae = report["settings"], report["vae"]
    config = json.loads((pipe_dir / "transformer" / "config.json").read_text())
    vae_config = json.loads((pipe_dir / "vae" / "config.json").read_text())
    weights = load_file(str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    params = sum(t.numel() for t in weights.values()) / 1e6
    width = config["num_attention_heads"] * config["attention_head_dim"]
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    size_mb = sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 1e6
    prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(report["grid_prompts"]))
    schedule, continued = settings.get("lr_schedule", "constant"), continued_line(report)
    refit = [report["vae_decoder_refit"]["command"]] if "vae_decoder_refit" in report else []
    # A decoder refit reads only the encoder's latents, so it commutes with the transformer's phases; it runs last.
    later_steps = [phase["command"] for phase in continued_phases(report)] + refit
    rebuild = "\n".join([report["command"], *later_steps])
    # Only the shipped folder is what the demo and the scripts load; any other pretrained folder is a candidate.
    shipped = pipe_dir.resolve() == SHIPPED_BASE
    title = "pretrained, embedded default" if shipped else "pretrained, not the shipped base"
    role = (
        "The demo, `train.sh` and `test.sh` start from it."
        if shipped
        else f"The demo, `train.sh` and `test.sh` start from the shipped `crfm/toy/{SHIPPED_BASE.name}`, not from "
        "this folder."
    )
    card = f"""# crfm tiny SD3.5 base ({title})

A randomly initialised tiny SD3.5 pipeline (`crfm.toy.tiny`, diffusers layout) pretrained on a CPU on
{report["corpus_images"]} unlabelled procedural toy scenes, text-to-image: the small-scale stand-in for the
SD3.5-medium that users of crfm fine-tune with masks. {role}

- **Architecture:** SD3.5-style MM-DiT (qk RMS-norm, dual attention in the first half), {config["num_layers"]}
  blocks, width {width}, patch {config["patch_size"]}, {params:.2f} M parameters; VAE {factor}x down-sampling with
  {vae_config["latent_channels"]} latent channels, so {settings["resolution"]} px images are
  {settings["resolution"] // factor // config["patch_size"]}x{settings["resolution"] // factor // config["patch_size"]}
  tokens; the position grid covers exactly that ({config["pos_embed_max_size"]} per side).
- **Load:** `StableDiffusion3Pipeline.from_pretrained(this_folder)` (offline; {size_mb:.1f} MB of safetensors
  and tokenizer files).
- **Data:** procedural scenes of `crfm.toy.toydata`, seed {report["corpus"].get("seed", "?")}, drawn at
  {report["corpus"].get("size", "?")} px and resized to {settings["resolution"]} px; only images and their class-list
  prompts were read, never the masks. The demo draws its scenes with other seeds.
- **VAE:** fitted as an autoencoder, {settings["vae_steps"]} steps, batch 8, loss L1 + MSE +
  {settings.get("vae_edge_weight", 0)} x image-gradient error (edges){adversarial_words(vae)}, cosine learning rate,
  flips and quarter turns, {vae["seconds"]} s; reconstruction
  MSE {vae["reconstruction_mse"]:.4f} (pixels in [-1, 1]), gradient error {vae.get("edge_error", float("nan")):.4f};
  shift {vae["shift_factor"]:.4f}, scale {vae["scaling_factor"]:.4f}.{decoder_line(report)}
- **Transformer:** all parameters, SD3's rectified-flow objective (logit-normal timesteps), AdamW lr
  {settings["learning_rate"]} ({settings["warmup_steps"]} warm-up steps, then {schedule}), batch
  {settings["batch_size"]}, prompt dropout {settings["prompt_dropout"]},
  flips{" and quarter turns" if settings.get("rot90") else ""}, compute {settings.get("mixed_precision", "no")}
  (weights fp32), {report["transformer_steps"]} steps in {report["transformer_seconds"]:.0f} s; EMA weights (decay
  {settings["ema_decay"]}) shipped. Mean loss {report["first_500_loss"]} over the first 500 steps,
  {report["last_500_loss"]} over the last 500.{continued}
- **Text encoders and tokenizers:** as built by `crfm.toy.tiny` (random, frozen); {settings["max_sequence_length"]} T5
  tokens per prompt while pretraining.

## Rebuild

```bash
{report["corpus"]["command"]}
{rebuild}
```

`bash scripts/pretrain_base.sh` runs {"them all" if later_steps else "both"}; re-run after an interruption, it continues
from the last checkpoint (every draw of step i and its learning rate are functions of the seed and i, so a resumed
run equals an uninterrupted one).

## Samples

`samples.png`: 28 Euler steps, no guidance, seeds 0..7, prompts:

{prompts}

![samples](samples.png)
"""
    write_text_atomic(pipe_dir / "README.md", card)

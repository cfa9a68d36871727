"""Build a tiny, randomly initialised SD3 / SD3.5 pipeline directory entirely offline.

The directory has the exact diffusers layout of the real `stabilityai/stable-diffusion-3.5-medium`
(transformer, vae, scheduler, three text encoders and their tokenizers, model_index.json), so
every code path that loads real weights is exercised by tests and the demo without a model hub.

    python -m crfm.toy.tiny OUT_DIR [--variant sd3.5|sd3] [--sample_size 8] [--layers 4] ... [--fit_vae_on INDEX]

Flags are snake_case like every crfm command; the hyphenated spellings (`--sample-size`) still work.
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from crfm.toy.pretrain import (
    REPORT,
    PretrainSettings,
    continue_pretraining,
    continued_phases,
    fit_vae,
    run_pretraining,
)
from crfm.utils.fileio import refuse_changed_settings
from crfm.utils.flags import UsageError, add_run_flags, bounded, entry_point, positive_float, positive_int

# Words the tiny tokenizers are trained on: remote-sensing prompts plus generic caption words,
# so prompts of this project tokenize into real sub-words instead of bytes.
_CORPUS_WORDS = """
a an the of and with in on at near by from to image photo picture view satellite aerial overhead
remote sensing scene top down high resolution orthophoto drone rural urban suburban city town village
bare soil land farmland cropland field fields agriculture agricultural crop crops forest forests tree trees
vegetation grass grassland meadow water river lake pond sea coast beach road roads street highway path
building buildings house houses roof roofs residential industrial commercial parking lot background
barren desert sand rock unpaved area traffic inland low medium dense sparse green brown grey gray blue
white red yellow dark light shadow shadows summer winter spring autumn cloud clouds clear sunny
""".split()


CONFIG_FILE = "crfm_tiny.json"  # the TinyConfig a folder was built with


@dataclass
class TinyConfig:
    """Sizes of every component; defaults keep a 64 px CPU training step well under a second."""

    variant: str = "sd3.5"  # "sd3": plain joint attention; "sd3.5": qk RMS norm + dual-attention layers
    sample_size: int = 8  # latent side of the default resolution (image side = sample_size * 2**(vae blocks - 1))
    patch_size: int = 2
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    latent_channels: int = 16
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # 4 blocks -> 8x downsampling, as the real VAE
    clip_l_dim: int = 32
    clip_g_dim: int = 48
    t5_dim: int = 96
    text_layers: int = 2
    clip_max_length: int = 77
    clip_vocab_size: int = 1000
    t5_vocab_size: int = 400
    seed: int = 0
    dual_attention_layers: tuple[int, ...] = field(default=())
    # Side of the sin-cos position grid, in tokens; positions are spaced base/max apart, base = sample_size/patch.
    # The default (8x the base side) allows large resolutions but makes neighbouring tokens' positions almost
    # equal; a small grid makes them distinct, which a tiny model needs to align mask and image tokens.
    pos_embed_max_size: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("sd3", "sd3.5"):
            raise ValueError(f"variant must be 'sd3' or 'sd3.5', got {self.variant!r}")
        if self.variant == "sd3.5" and not self.dual_attention_layers:
            # SD3.5-medium uses dual attention in its first layers and plain joint attention after.
            self.dual_attention_layers = tuple(range(max(1, self.layers // 2)))
        if self.variant == "sd3":
            self.dual_attention_layers = ()
        if self.clip_l_dim + self.clip_g_dim > self.t5_dim:
            raise ValueError("t5_dim must be >= clip_l_dim + clip_g_dim (CLIP states are padded to T5 width)")


def _tokenizer_corpus() -> list[str]:
    # Repeated short phrases give the BPE/unigram trainers frequency statistics to merge on.
    words = _CORPUS_WORDS
    phrases = [" ".join(words[i : i + 6]) for i in range(len(words))]
    class_lists = [", ".join(words[i : i + 4]) for i in range(0, len(words), 2)]
    return (phrases + class_lists) * 4 + ["a satellite image of " + w for w in words]


def build_clip_tokenizer(config: TinyConfig, pad_token: str):
    """A byte-level BPE tokenizer with CLIP's normalisation, pre-tokenisation and special tokens."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    backend = Tokenizer(BPE(unk_token=eos, end_of_word_suffix="</w>"))
    # Same normaliser and splitting regex as transformers' CLIPTokenizer, so training and use agree.
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=config.clip_vocab_size,
        special_tokens=["!", bos, eos],  # "!" first: CLIP-G pads with "!" (id 0), as the real tokenizer_2
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Every single byte must also exist as a word-final token, else unseen words map to <unk>.
    for char in sorted(alphabet):
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=config.clip_max_length)


def build_t5_tokenizer(config: TinyConfig):
    """A unigram tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2) and metaspace splitting."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    backend = Tokenizer(Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = UnigramTrainer(
        vocab_size=config.t5_vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def build_pipeline(config: TinyConfig):
    """Instantiate every component with random weights and return a `StableDiffusion3Pipeline`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from crfm.utils.quiet import sd3_pipeline_module

    StableDiffusion3Pipeline = sd3_pipeline_module().StableDiffusion3Pipeline

    tokenizer = build_clip_tokenizer(config, pad_token="<|endoftext|>")
    tokenizer_2 = build_clip_tokenizer(config, pad_token="!")
    tokenizer_3 = build_t5_tokenizer(config)

    def clip_encoder(dim: int, act: str, seed: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=dim,
                intermediate_size=dim * 2,
                projection_dim=dim,
                num_hidden_layers=config.text_layers,
                num_attention_heads=4,
                max_position_embeddings=config.clip_max_length,
                hidden_act=act,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()

    text_encoder = clip_encoder(config.clip_l_dim, "quick_gelu", config.seed + 1)  # CLIP-L/14
    text_encoder_2 = clip_encoder(config.clip_g_dim, "gelu", config.seed + 2)  # OpenCLIP bigG/14

    torch.manual_seed(config.seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=config.t5_dim,
            d_kv=config.t5_dim // 4,
            d_ff=config.t5_dim * 2,
            num_layers=config.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's T5-XXL
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
    ).eval()

    torch.manual_seed(config.seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        num_layers=config.layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=config.t5_dim,
        caption_projection_dim=config.heads * config.head_dim,
        pooled_projection_dim=config.clip_l_dim + config.clip_g_dim,
        # Large enough for 8x the default resolution; positions are cropped from the centre.
        pos_embed_max_size=config.pos_embed_max_size or max(32, 8 * config.sample_size // config.patch_size),
        dual_attention_layers=config.dual_attention_layers,
        qk_norm="rms_norm" if config.variant == "sd3.5" else None,
    )

    torch.manual_seed(config.seed + 5)
    n_blocks = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks,
        up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=min(8, min(config.vae_channels)),
        sample_size=config.sample_size * 2 ** (n_blocks - 1),
        scaling_factor=1.5305,  # SD3's latent statistics, so the scaling code path is the real one
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def save_tiny_pipeline(out_dir: str | Path, config: TinyConfig | None = None) -> Path:
    """Write a tiny pipeline directory loadable by `StableDiffusion3Pipeline.from_pretrained`."""
    config = config or TinyConfig()
    out_dir = Path(out_dir)
    pipe = build_pipeline(config)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out_dir


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case; the hyphenated spellings of earlier versions still work."""
    defaults = TinyConfig()
    parser = argparse.ArgumentParser(
        prog="python -m crfm.toy.tiny", description="Write a tiny random SD3/SD3.5 pipeline directory (offline)."
    )

    def add(name: str, **kwargs) -> None:
        hyphenated = name.replace("_", "-")
        spellings = [f"--{name}"] + ([f"--{hyphenated}"] if hyphenated != name else [])
        parser.add_argument(*spellings, dest=name, **kwargs)

    parser.add_argument("out_dir", type=Path, help="pipeline folder to write")
    add("variant", choices=["sd3", "sd3.5"], default=defaults.variant, help="sd3.5: qk RMS norm + dual attention")
    add("sample_size", type=positive_int, default=defaults.sample_size, help="default latent side")
    add("patch_size", type=positive_int, default=defaults.patch_size, help="transformer patch side")
    add("layers", type=positive_int, default=defaults.layers, help="MM-DiT blocks")
    add("heads", type=positive_int, default=defaults.heads, help="attention heads")
    add("head_dim", type=positive_int, default=defaults.head_dim, help="width per head")
    add("dual_attention_layers", type=_int_tuple, default=(), help="e.g. 0,1 (sd3.5; default: the first half)")
    add("vae_channels", type=_int_tuple, default=defaults.vae_channels, help="one per VAE block")
    add("latent_channels", type=positive_int, default=defaults.latent_channels, help="SD3: 16")
    add("clip_l_dim", type=positive_int, default=defaults.clip_l_dim, help="CLIP-L width")
    add("clip_g_dim", type=positive_int, default=defaults.clip_g_dim, help="CLIP-G width")
    add("t5_dim", type=positive_int, default=defaults.t5_dim, help="T5 width (>= clip_l_dim + clip_g_dim)")
    add("text_layers", type=positive_int, default=defaults.text_layers, help="layers of each text encoder")
    add(
        "clip_max_length",
        type=positive_int,
        default=defaults.clip_max_length,
        help="CLIP tokens per prompt (SD3: 77; text tokens cost as much as image tokens in every block)",
    )
    add("pos_embed_max_size", type=positive_int, help="position grid side in tokens (max tokens per side)")
    add("fit_vae_on", type=Path, help="index.jsonl whose images the tiny VAE is fitted to")
    add("vae_steps", type=bounded(int, 0), default=1500, help="steps fitting the VAE")
    add(
        "vae_size",
        type=positive_int,
        default=64,
        help="px of the images the VAE is fitted (and the base pretrained) on",
    )
    add(
        "pretrain_on",
        type=Path,
        help="index.jsonl of an unlabelled corpus: fit the VAE, then pretrain the "
        "transformer text-to-image on it (resumable; re-run the same command to continue)",
    )
    add("pretrain_steps", type=positive_int, default=PretrainSettings.steps, help="transformer pretraining steps")
    add(
        "pretrain_lr_schedule",
        choices=["constant", "cosine"],
        default=PretrainSettings.lr_schedule,
        help="learning rate after warm-up: constant, or cosine decay to 0 (an annealing phase)",
    )
    add("pretrain_batch_size", type=positive_int, default=PretrainSettings.batch_size, help="pretraining batch")
    add(
        "pretrain_lr",
        type=positive_float,
        default=PretrainSettings.learning_rate,
        help="pretraining AdamW learning rate",
    )
    add(
        "max_sequence_length",
        type=positive_int,
        default=PretrainSettings.max_sequence_length,
        help="T5 tokens per prompt while pretraining",
    )
    add(
        "vae_edge_weight",
        type=bounded(float, 0),
        default=PretrainSettings.vae_edge_weight,
        help="weight of the image-gradient term of the VAE fit (keeps edges)",
    )
    add(
        "vae_adversarial_weight",
        type=bounded(float, 0),
        default=PretrainSettings.vae_adversarial_weight,
        help="weight of the patch critic's adversarial term of the VAE fit or decoder refit, scaled adaptively "
        "against the pixel loss (0: none; SD's autoencoders use 0.5)",
    )
    add(
        "rot90",
        action=argparse.BooleanOptionalAction,
        default=PretrainSettings.rot90,
        help="quarter turns while pretraining",
    )
    add(
        "refit_vae_decoder_on",
        type=Path,
        help="index.jsonl: fit only the VAE decoder of the existing pipeline OUT_DIR on its images, --vae_steps steps "
        "(encoder, latent space and transformer unchanged; resumable in --pretrain_work_dir)",
    )
    add(
        "scheduler_shift",
        type=positive_float,
        help="the flow-matching scheduler's shift for pretraining and every later use of the base (built: 3.0, "
        "SD3's for 1024 px; a lower shift trains and samples more of the low-noise steps where texture is drawn)",
    )
    add(
        "continue_pretraining_on",
        type=Path,
        help="index.jsonl: a later pretraining phase for the transformer of the pretrained pipeline OUT_DIR, "
        "--pretrain_steps more steps from its EMA weights with --pretrain_lr and --pretrain_lr_schedule (VAE and "
        "text encoders unchanged; resumable in --pretrain_work_dir, default OUT_DIR.continued)",
    )
    add("pretrain_work_dir", type=Path, help="checkpoints and loss log of pretraining (default: OUT_DIR.work)")
    # --mixed_precision bf16: autocast while pretraining (weights and optimizer stay fp32)
    add_run_flags(
        parser,
        seed_help="seed of the random weights and of the VAE fit",
        seed_default=defaults.seed,
        mixed_precision=True,
    )
    return parser


# Flags naming an index whose images the VAE is fitted to (one job each; they exclude each other).
INDEX_FLAGS = ("fit_vae_on", "pretrain_on", "refit_vae_decoder_on", "continue_pretraining_on")


def build(args: argparse.Namespace) -> int:
    """Write the pipeline of `args` (and fit its VAE with --fit_vae_on, or pretrain it); 0 on success."""
    given = [flag for flag in INDEX_FLAGS if getattr(args, flag) is not None]
    for flag in given:
        if not Path(getattr(args, flag)).is_file():
            raise UsageError(f"--{flag}: no index file at {getattr(args, flag)}")  # before minutes of work
    if len(given) > 1:
        raise UsageError(", ".join(f"--{flag}" for flag in INDEX_FLAGS) + " exclude each other")
    if args.refit_vae_decoder_on is not None:
        return refit_decoder(args)
    if args.continue_pretraining_on is not None:
        return continue_pretrain(args)
    # Every TinyConfig field that is a flag comes from the command line; the rest keep their defaults.
    config = TinyConfig(**{f.name: getattr(args, f.name) for f in fields(TinyConfig) if hasattr(args, f.name)})
    if args.pretrain_on is not None:
        return pretrain(args, config)
    out = save_tiny_pipeline(args.out_dir, config)
    side = config.sample_size * 2 ** (len(config.vae_channels) - 1)
    print(f"wrote tiny {config.variant} pipeline to {out} (default image size {side} px)")
    if args.fit_vae_on is not None:
        stats = fit_vae(
            out,
            args.fit_vae_on,
            steps=args.vae_steps,
            size=args.vae_size,
            edge_weight=args.vae_edge_weight,
            adversarial_weight=args.vae_adversarial_weight,
            seed=args.seed,
            progress=not args.no_progress,
        )
        print(f"fitted the VAE on {args.fit_vae_on}: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    return 0


def refit_decoder(args: argparse.Namespace) -> int:
    """Fit the VAE decoder of the existing pipeline OUT_DIR again (`crfm.toy.pretrain.refit_vae_decoder`)."""
    import shlex
    import sys

    from crfm.toy.pretrain import refit_vae_decoder

    out = Path(args.out_dir)
    if not (out / "vae" / "config.json").is_file():
        raise UsageError(f"--refit_vae_decoder_on: {out} holds no pipeline with a VAE to refit")
    work = args.pretrain_work_dir or out.with_name(out.name + ".decoder")
    command = "python -m crfm.toy.tiny " + shlex.join(sys.argv[1:])
    stats = refit_vae_decoder(
        out, args.refit_vae_decoder_on, work, args.vae_steps, args.vae_edge_weight, args.vae_size, args.seed, command,
        progress=not args.no_progress, adversarial_weight=args.vae_adversarial_weight,
    )  # fmt: skip
    print(f"refitted the VAE decoder of {out}: MSE {stats['reconstruction_mse']:.4f}, edges {stats['edge_error']:.4f}")
    return 0


def optimisation_settings(args: argparse.Namespace) -> dict:
    """The PretrainSettings that the flags set in every pretraining phase (a second phase keeps the first's data
    settings and takes only these)."""
    return {
        "steps": args.pretrain_steps,
        "batch_size": args.pretrain_batch_size,
        "learning_rate": args.pretrain_lr,
        "lr_schedule": args.pretrain_lr_schedule,
        "scheduler_shift": args.scheduler_shift,
        "mixed_precision": args.mixed_precision or "no",
    }


def continue_pretrain(args: argparse.Namespace) -> int:
    """A later pretraining phase for OUT_DIR's transformer (`crfm.toy.pretrain.continue_pretraining`): the data
    settings (resolution, prompt length, augmentation, seed) stay the first phase's; the flags set the optimisation."""
    import shlex
    import sys

    out = Path(args.out_dir)
    if not (out / REPORT).is_file():
        raise UsageError(f"--continue_pretraining_on: {out} holds no pretrained pipeline ({REPORT}); use --pretrain_on")
    first = json.loads((out / REPORT).read_text())["settings"]
    settings = replace(PretrainSettings.from_record(first), **optimisation_settings(args))
    work = args.pretrain_work_dir or out.with_name(out.name + ".continued")
    command = "python -m crfm.toy.tiny " + shlex.join(sys.argv[1:])
    phase = continue_pretraining(out, args.continue_pretraining_on, work, settings, command, not args.no_progress)
    done = continued_phases(phase)[-1]
    print(
        f"continued pretraining {out}: {done['transformer_steps']} more steps in {done['transformer_seconds']:.0f} s, "
        f"loss {done['first_500_loss']} -> {done['last_500_loss']}"
    )
    return 0


def pretrain(args: argparse.Namespace, config: TinyConfig) -> int:
    """Build OUT_DIR once, then fit and pretrain it (`crfm.toy.pretrain`); a re-run resumes where it stopped."""
    import shlex
    import sys

    out = Path(args.out_dir)
    # Rebuilding would retrain the tokenizers (not bit-reproducible), so an existing folder is resumed as is.
    recorded = json.loads(json.dumps(asdict(config)))  # as the record holds it: tuples are JSON lists
    if not refuse_changed_settings(out / CONFIG_FILE, recorded, "a tiny pipeline", "resume with the same flags"):
        save_tiny_pipeline(out, config)
    settings = PretrainSettings(
        resolution=args.vae_size,
        max_sequence_length=args.max_sequence_length,
        vae_steps=args.vae_steps,
        vae_edge_weight=args.vae_edge_weight,
        vae_adversarial_weight=args.vae_adversarial_weight,
        rot90=args.rot90,
        seed=args.seed,
        **optimisation_settings(args),
    )
    work = args.pretrain_work_dir or out.with_name(out.name + ".work")
    command = "python -m crfm.toy.tiny " + shlex.join(sys.argv[1:])
    report = run_pretraining(out, args.pretrain_on, work, settings, command, progress=not args.no_progress)
    print(
        f"pretrained {out}: VAE MSE {report['vae']['reconstruction_mse']:.4f}, transformer "
        f"{report['transformer_steps']} steps in {report['transformer_seconds']:.0f} s, "
        f"loss {report['first_500_loss']} -> {report['last_500_loss']}"
    )
    return 0


main = entry_point(build_parser, build)


if __name__ == "__main__":
    raise SystemExit(main())

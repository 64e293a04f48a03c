//! Command-line parsing and the subcommands. Each subcommand is a thin layer over the library:
//! it turns flags into library calls and results into text.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokenformer_core::{Device, Error, Result};
use tokenformer_models::bench::{bench_matmul, bench_train, cpu_info, MatmulShape};
use tokenformer_models::checkpoint::inspect_checkpoint;
use tokenformer_models::checkpoint::{
    is_checkpoint_dir, parse_config_json, save_checkpoint, Checkpoint,
};
use tokenformer_models::config::TokenGroup;
use tokenformer_models::data::{StreamDecoder, Tokenizer};
use tokenformer_models::evaluate::{
    evaluate_tokens, evaluate_tokens_per_position, parse_token_ids, save_token_ids, text_token_ids,
    write_token_ids,
};
use tokenformer_models::experiment::{
    default_experiment_dir, results_table, run_growth_experiment, ExperimentControl, Plan, Scale,
};
use tokenformer_models::files::{bytes_text, open_regular, read_open, read_regular, replace_file};
use tokenformer_models::generate::{generate, SampleOptions};
use tokenformer_models::growth::{grow_checkpoint, GrowSpec, GrowthPoint, LayerPlacement, TauRule};
use tokenformer_models::import::{import_checkpoint, ImportOptions, RELEASED};
use tokenformer_models::memory;
use tokenformer_models::progress::{thousands, Progress};
use tokenformer_models::run_dir::{clear_unfinished, RunLock};
use tokenformer_models::train::{
    check_new_run, load_model, resume_plan, train_new, train_resume_options, ResumeOptions,
    StageLr, TrainControl, TrainSettings,
};
use tokenformer_models::{config::SizeOverrides, Arch, GrowInit, ModelConfig, Theta, TokenFormer};

#[derive(Parser)]
#[command(
    name = "tokenformer",
    version,
    about = "TokenFormer: transformers whose linear layers are attention over parameter tokens"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (with no flags: preset tiny on the built-in tiny shakespeare)
    Train(Box<TrainArgs>),
    /// Add parameter tokens to a checkpoint, preserving its outputs (SPEC §4)
    Grow(GrowArgs),
    /// Write a freshly initialised checkpoint
    Init(InitArgs),
    /// Print a model's config and parameter counts
    Info(InfoArgs),
    /// Convert the authors' released weights (torch.save .bin/.pt, a DeepSpeed checkpoint
    /// folder, or safetensors with their names) into a checkpoint directory
    Import(ImportArgs),
    /// Mean next-token loss of a checkpoint on a text file or a file of token ids
    Eval(EvalArgs),
    /// Write the token ids of a text file, as `eval --tokens` reads them
    Tokenize(TokenizeArgs),
    /// Sample text from a checkpoint
    Generate(GenerateArgs),
    /// Time full training steps (forward, backward, AdamW) and a large matmul
    Bench(BenchArgs),
    /// Experiments that compare runs
    #[command(subcommand)]
    Experiment(ExperimentCommand),
}

#[derive(Subcommand)]
enum ExperimentCommand {
    /// Growth against training from scratch: six arms on the same data and budget, each over
    /// --seeds seeds; results.md, results.json and loss_vs_flops.png
    Growth(GrowthExperimentArgs),
}

#[derive(Args)]
struct GrowthExperimentArgs {
    /// Experiment directory [default: runs/experiment-growth-N, the first free N]; the same
    /// command on an interrupted experiment's directory continues it
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to train: cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
    /// small (about 15 minutes a seed on two CPU cores) or medium (sized for one GPU)
    #[arg(long, default_value = "small")]
    scale: String,
    /// The same pipeline at a toy size, in seconds [default: off]
    #[arg(long)]
    quick: bool,
    /// The first seed of every arm's initialisation and batches
    #[arg(long, default_value_t = TrainSettings::default().seed)]
    seed: u64,
    /// Seeds per arm: SEED, SEED+1, ...; the tables give mean ± sd over them
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// First sweep the learning rate (x1/4 ... x4 of the scale's, further while the best is at
    /// an end) of each model the arms start from, then train every arm at its model's best
    /// [default: off]
    #[arg(long)]
    tune_lr: bool,
    /// A folder with train/ and val/ folders of .txt books
    #[arg(long, default_value = tokenformer_models::experiment::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Growths from a quarter of the final tokens to the final size
    #[arg(long, default_value_t = 3)]
    growths: usize,
    /// Share of the steps the base model trains before the first growth [default: all stages
    /// equally long]
    #[arg(long)]
    base_share: Option<f64>,
    /// The grown arms' learning rate after a growth: continue (one schedule, as scratch's) or
    /// restart (a new warmup and cosine per stage)
    #[arg(long, default_value_t = StageLr::default().to_string())]
    stage_lr: String,
    /// Add a seventh arm: scratch with the exact grown arms' τ = √n₀ (n₀ the base's token counts)
    /// [default: off]
    #[arg(long)]
    tau_control: bool,
    /// Run only these arms (comma-separated; scratch must be one): scratch, grown, transformer,
    /// grown-random, grown-official, grown-frozen, scratch-tau [default: the six arms, seven
    /// with --tau-control]
    #[arg(long, value_delimiter = ',')]
    arms: Vec<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Model preset: tiny, small, 150M, 450M, ... [default: tiny]
    #[arg(long)]
    preset: Option<String>,
    /// Text files or directories [default: the built-in tiny shakespeare]
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Validation text files or directories [default: the last 10% of --data]
    #[arg(long, num_args = 1..)]
    val_data: Vec<PathBuf>,
    /// byte, gpt2 or neox [default: byte; with --init-from, the checkpoint's]
    #[arg(long)]
    tokenizer: Option<String>,
    /// Optimizer steps of the run; on --resume of a finished run, more steps extend it by a new
    /// stage [default: 1500]
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch [default: 16]
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence (at most the model's max_seq_len) [default: 64]
    #[arg(long)]
    seq: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation) [default: 1]
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate, reached at the end of the warmup [default: 5e-3]
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Learning rate at the end of the cosine decay [default: 5e-4]
    #[arg(long, allow_negative_numbers = true)]
    min_lr: Option<f32>,
    /// Steps of linear warmup to --lr [default: 30]
    #[arg(long)]
    warmup: Option<u64>,
    /// AdamW's decoupled weight decay [default: 0.1]
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f32>,
    /// Global gradient-norm clip, 0 disables [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    clip: Option<f32>,
    /// Seed of the initialisation and of the batches [default: 1337]
    #[arg(long)]
    seed: Option<u64>,
    /// Steps between validation losses (and plot redraws) [default: 250]
    #[arg(long)]
    eval_every: Option<u64>,
    /// Steps between checkpoints (one is also saved at the end) [default: 500]
    #[arg(long)]
    save_every: Option<u64>,
    /// Grow the model after STEP steps (repeatable). SPEC: qkv=+64,proj=+64,ffn=+256,layers=+2
    /// (+N adds, N grows to), or preset=NAME; optionally layer-at=interleave, init=random,
    /// tau=current [default: no growth]
    #[arg(long, value_name = "STEP:SPEC")]
    grow_at: Vec<String>,
    /// The learning rate after a growth (or in the new stage of an extended run): continue
    /// (one schedule over the run) or restart (a new warmup and cosine per stage)
    /// [default: continue]
    #[arg(long)]
    stage_lr: Option<String>,
    /// After a growth, train only what it added (old tokens, embedding and norm stay fixed);
    /// also on --resume of a run grown by `grow` [default: off]
    #[arg(long)]
    freeze_old: bool,
    #[command(flatten)]
    arch: ArchArgs,
    /// Run directory [default: runs/<preset>-N, the first free N]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory with its own settings (--steps, --stage-lr and
    /// --freeze-old may change what is still ahead of it) [default: a new run]
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start a new run from the model of this checkpoint directory (made by init, grow or
    /// train), with a fresh optimizer and schedule [default: a freshly initialised model]
    #[arg(long, value_name = "CHECKPOINT", conflicts_with_all = [
        "resume", "preset", "arch", "d_ff", "layers", "d_model", "heads", "qkv_tokens",
        "proj_tokens", "ffn_tokens", "max_seq_len",
    ])]
    init_from: Option<PathBuf>,
    /// Start again in an --out directory whose run stopped before its first checkpoint
    /// [default: off]
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Where to train: cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tokens (characters, with the byte tokenizer) of text sampled at the end of the run
    #[arg(long, default_value_t = 400)]
    sample_tokens: usize,
}

/// The architecture and size flags of `train`, `init`, `info` and `bench`: each changes the
/// preset's value.
#[derive(Args)]
struct ArchArgs {
    /// tokenformer (Pattentions over parameter tokens) or transformer (the same decoder with
    /// linear layers: the baseline) [default: tokenformer]
    #[arg(long)]
    arch: Option<String>,
    /// A transformer's MLP width: a number, or `match` for the parameter count of the
    /// TokenFormer preset [default: 4·d_model]
    #[arg(long)]
    d_ff: Option<String>,
    /// Decoder layers [default: the preset's]
    #[arg(long)]
    layers: Option<usize>,
    /// Model width d (a multiple of --heads) [default: the preset's]
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads [default: the preset's]
    #[arg(long)]
    heads: Option<usize>,
    /// Parameter tokens of each query, key and value Pattention [default: the preset's]
    #[arg(long)]
    qkv_tokens: Option<usize>,
    /// Parameter tokens of each attention output Pattention [default: the preset's]
    #[arg(long)]
    proj_tokens: Option<usize>,
    /// Parameter tokens of each MLP Pattention [default: the preset's]
    #[arg(long)]
    ffn_tokens: Option<usize>,
    /// Longest context the model reads [default: the preset's]
    #[arg(long)]
    max_seq_len: Option<usize>,
}

impl ArchArgs {
    fn sizes(&self) -> SizeOverrides {
        SizeOverrides {
            n_layers: self.layers,
            d_model: self.d_model,
            n_heads: self.heads,
            qkv_tokens: self.qkv_tokens,
            proj_tokens: self.proj_tokens,
            ffn_tokens: self.ffn_tokens,
            max_seq_len: self.max_seq_len,
        }
    }

    /// `preset` with the size flags, for a model of architecture `arch`.
    fn sized(&self, preset: &ModelConfig, arch: Arch) -> Result<ModelConfig> {
        let tokens = [self.qkv_tokens, self.proj_tokens, self.ffn_tokens];
        if arch != Arch::TokenFormer && tokens.iter().any(Option::is_some) {
            return Err(Error::invalid(
                "--qkv-tokens, --proj-tokens and --ffn-tokens size a tokenformer's Pattentions; \
                 a transformer's MLP width is --d-ff",
            ));
        }
        self.sizes().apply(preset)
    }

    fn arch(&self) -> Result<Option<Arch>> {
        self.arch.as_deref().map(str::parse).transpose()
    }

    /// The MLP width asked for, `match` resolved against the TokenFormer `preset`.
    fn d_ff(&self, arch: Arch, preset: &ModelConfig) -> Result<Option<usize>> {
        let Some(text) = self.d_ff.as_deref() else { return Ok(None) };
        if arch != Arch::Transformer {
            return Err(Error::invalid("--d-ff is a transformer setting (add --arch transformer)"));
        }
        if text == "match" {
            return Ok(Some(preset.matching_transformer().d_ff));
        }
        match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::invalid(format!(
                "--d-ff must be a positive number or 'match', got '{text}'"
            ))),
        }
    }

    /// `preset` in the architecture and sizes asked for.
    fn apply(&self, preset: &ModelConfig) -> Result<ModelConfig> {
        let arch = self.arch()?.unwrap_or_default();
        let sized = self.sized(preset, arch)?;
        sized.with_arch(arch, self.d_ff(arch, &sized)?)
    }
}

#[derive(Args)]
struct GrowArgs {
    /// Checkpoint directory to grow (it is only read)
    #[arg(long)]
    checkpoint: PathBuf,
    /// New directory for the grown checkpoint
    #[arg(long)]
    out: PathBuf,
    /// Tokens added to every query, key and value Pattention
    #[arg(long, default_value_t = 0)]
    qkv: usize,
    /// Tokens added to every attention output Pattention
    #[arg(long, default_value_t = 0)]
    proj: usize,
    /// Tokens added to every mlp Pattention
    #[arg(long, default_value_t = 0)]
    ffn: usize,
    /// New layers (their output values start at zero: outputs unchanged, for every Θ)
    #[arg(long, default_value_t = 0)]
    layers: usize,
    /// Where new layers go: end, or interleave (spread among the old ones)
    #[arg(long, default_value = "end")]
    layer_at: String,
    /// Grow to this preset (it may differ only in token counts and depth) [default: the counts
    /// above]
    #[arg(long, conflicts_with_all = ["qkv", "proj", "ffn", "layers"])]
    to_preset: Option<String>,
    /// exact (zero keys: outputs unchanged) or random (new keys and values from the init:
    /// outputs change)
    #[arg(long, default_value = "exact")]
    init: String,
    /// frozen (τ = √n₀ of creation: exact growth) or current (τ = √n of the grown layers, and
    /// the optimizer restarts: the official recipe with --init random; outputs change)
    #[arg(long, default_value = "frozen")]
    tau: String,
    /// Seed of the new tokens' values
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda: where the tokens are appended (the result is the same on either)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Grow into an --out directory whose earlier grow stopped before its checkpoint
    /// [default: off]
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct InitArgs {
    /// Model preset: tiny, small, 150M, 450M, ... (the size flags below change it)
    #[arg(long)]
    preset: String,
    /// New directory for the checkpoint
    #[arg(long)]
    out: PathBuf,
    /// Seed of the initialisation
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vocabulary size [default: the preset's]
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Θ of every Pattention: l2_norm_gelu, gelu_l2_norm or softmax [default: l2_norm_gelu]
    #[arg(long)]
    norm: Option<String>,
    #[command(flatten)]
    arch: ArchArgs,
}

#[derive(Args)]
struct InfoArgs {
    /// Model preset to describe (the flags below change it) [default: give --checkpoint]
    #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    preset: Option<String>,
    /// Checkpoint directory to describe [default: give --preset]
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --preset
    #[command(flatten)]
    arch: ArchArgs,
}

#[derive(Args)]
struct ImportArgs {
    /// A torch.save file (plain state_dict or {'module': ...}), a DeepSpeed checkpoint folder
    /// (mp_rank_00_model_states.pt) or a safetensors file, under the released names
    src: PathBuf,
    /// The checkpoint directory to write
    #[arg(long)]
    out: PathBuf,
    /// Attention heads [default: the released config's, when the shapes match one]
    #[arg(long)]
    heads: Option<usize>,
    /// Context length [default: the released config's, when the shapes match one]
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// byte, gpt2 or neox [default: the released config's, neox]
    #[arg(long)]
    tokenizer: Option<String>,
    /// l2_norm_gelu, gelu_l2_norm or softmax [default: l2_norm_gelu, as released]
    #[arg(long)]
    norm: Option<String>,
    /// A config.json (SPEC §6.2) giving every setting; its shapes must match the tensors'
    /// [default: settings from the shapes and the flags above]
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    /// Checkpoint directory of the model
    #[arg(long)]
    checkpoint: PathBuf,
    /// File of whitespace-separated token ids, as `tokenize` writes [default: give --text]
    #[arg(long, required_unless_present = "text", conflicts_with = "text")]
    tokens: Option<PathBuf>,
    /// Text file (`-`: standard input), tokenized with the checkpoint's tokenizer [default:
    /// give --tokens]
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Print one JSON object: {"loss": ..., "tokens": ...} [default: off]
    #[arg(long)]
    json: bool,
    /// Also write the loss at every predicted position to FILE (.json or .safetensors; a new
    /// file), to compare with another implementation token by token [default: off]
    #[arg(long, value_name = "FILE")]
    per_token: Option<PathBuf>,
    /// Where to evaluate: cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Text file to tokenize (`-`: standard input)
    file: PathBuf,
    /// byte, gpt2 or neox: the tokenizer of the model to evaluate (its config.json names it)
    #[arg(long, default_value = "byte")]
    tokenizer: String,
    /// New file for the ids [default: standard output]
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The prompt and temperature of `generate`, also used for the sample at the end of `train`.
const DEFAULT_PROMPT: &str = "\n";
const DEFAULT_TEMPERATURE: f32 = 0.8;

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory of the model
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text the sample continues
    #[arg(long, default_value = DEFAULT_PROMPT)]
    prompt: String,
    /// Tokens to sample
    #[arg(long, default_value_t = 500)]
    max_tokens: usize,
    /// Softmax temperature of the sampling (0: always the likeliest token)
    #[arg(long, default_value_t = DEFAULT_TEMPERATURE)]
    temperature: f32,
    /// Sample only among the K likeliest tokens [default: the whole vocabulary]
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run: cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct BenchArgs {
    /// Where to run: cpu or cuda
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Model preset (the flags below change it)
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[command(flatten)]
    arch: ArchArgs,
    /// Sequences per step
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence
    #[arg(long, default_value_t = 64)]
    seq: usize,
    /// Steps timed (after two untimed warm-up steps); 0 times only the matmul
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Allow TF32 tensor cores for fp32 matmuls (CUDA) [default: off]
    #[arg(long)]
    tf32: bool,
    /// The matmul timed first: a size N (N x N times N x N) or a shape MxKxN (0 skips it)
    #[arg(long, default_value = "1024")]
    matmul: String,
    /// Also time the matmul's backward pass (its two gradient products) [default: off]
    #[arg(long)]
    matmul_backward: bool,
    /// Also print the time per op, forward and backward, and its share of the step
    /// [default: off]
    #[arg(long)]
    profile: bool,
    /// Print one JSON object instead of the table [default: off]
    #[arg(long)]
    json: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    // An unreadable TOKENFORMER_CPU_ISA stops every command before it starts work.
    tokenformer_ops::processor::isa_cap()?;
    match cli.command {
        // No subcommand: `train` with every flag at its default.
        None => run(Cli::parse_from(["tokenformer", "train"])),
        Some(Command::Train(a)) => train(*a),
        Some(Command::Grow(a)) => grow(a),
        Some(Command::Init(a)) => init(a),
        Some(Command::Info(a)) => info(a),
        Some(Command::Import(a)) => import(a),
        Some(Command::Eval(a)) => eval(a),
        Some(Command::Tokenize(a)) => tokenize(a),
        Some(Command::Generate(a)) => generate_text(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Experiment(ExperimentCommand::Growth(a))) => growth_experiment(a),
    }
}

fn parse_device(s: &str) -> Result<Device> {
    s.parse()
}

/// The first `runs/<preset>-N` (`runs/<preset>-transformer-N` for the baseline) that does not
/// exist yet.
fn default_run_dir(settings: &TrainSettings) -> PathBuf {
    let name = match settings.arch {
        Arch::TokenFormer => settings.preset.clone(),
        arch => format!("{}-{arch}", settings.preset),
    };
    (1..)
        .map(|n| PathBuf::from(format!("runs/{name}-{n}")))
        .find(|p| !p.exists())
        .expect("unbounded")
}

/// A setting as a message shows it: the way it is written on the command line.
trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_as_displayed {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_as_displayed!(String, u64, usize, f32, Arch, tokenformer_models::train::StageLr);

impl Shown for Option<usize> {
    fn shown(&self) -> String {
        self.map_or_else(|| "(default)".into(), |n| n.to_string())
    }
}

impl Shown for Vec<PathBuf> {
    fn shown(&self) -> String {
        self.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
    }
}

impl Shown for Vec<GrowthPoint> {
    fn shown(&self) -> String {
        self.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")
    }
}

/// Overlays the flags on `base`; with `check`, a flag that differs from `base` is an error
/// instead (a resumed run keeps every setting it started with).
fn apply_train_flags(a: &TrainArgs, base: &mut TrainSettings, check: Option<&Path>) -> Result<()> {
    fn set<T: PartialEq + Shown + Clone>(
        flag: &str,
        given: Option<T>,
        slot: &mut T,
        check: Option<&Path>,
    ) -> Result<()> {
        let Some(v) = given else { return Ok(()) };
        match check {
            Some(dir) if *slot != v => Err(Error::invalid(format!(
                "--{flag} {} contradicts the run in {} ({flag} {}); a resumed run keeps its settings",
                v.shown(),
                dir.display(),
                slot.shown()
            ))),
            _ => {
                *slot = v;
                Ok(())
            }
        }
    }
    set("preset", a.preset.clone(), &mut base.preset, check)?;
    let arch = a.arch.arch()?;
    set("arch", arch, &mut base.arch, check)?;
    let sizes = a.arch.sizes();
    if !sizes.is_empty() {
        if let Some(dir) = check {
            return Err(Error::invalid(format!(
                "{} sizes a new model; the run in {} keeps its own (start a new run from it with \
                 --init-from)",
                sizes.flags().join(" "),
                dir.display()
            )));
        }
        base.model = Some(a.arch.sized(&ModelConfig::preset(&base.preset)?, base.arch)?);
    }
    let preset = ModelConfig::preset(&base.preset)?;
    let d_ff = a.arch.d_ff(base.arch, base.model.as_ref().unwrap_or(&preset))?;
    set("d-ff", d_ff.map(Some), &mut base.d_ff, check)?;
    // Absolute, as a run stores them: the same files whatever directory a resume runs from.
    use tokenformer_models::train::absolute_paths;
    let data = (!a.data.is_empty()).then(|| absolute_paths(&a.data)).transpose()?;
    set("data", data, &mut base.data, check)?;
    let val_data = (!a.val_data.is_empty()).then(|| absolute_paths(&a.val_data)).transpose()?;
    set("val-data", val_data, &mut base.val_data, check)?;
    set("tokenizer", a.tokenizer.clone(), &mut base.tokenizer, check)?;
    set("steps", a.steps, &mut base.steps, check)?;
    set("batch", a.batch, &mut base.batch, check)?;
    set("seq", a.seq, &mut base.seq, check)?;
    set("grad-accum", a.grad_accum, &mut base.grad_accum, check)?;
    set("lr", a.lr, &mut base.lr, check)?;
    set("min-lr", a.min_lr, &mut base.min_lr, check)?;
    set("warmup", a.warmup, &mut base.warmup, check)?;
    set("weight-decay", a.weight_decay, &mut base.weight_decay, check)?;
    set("clip", a.clip, &mut base.clip, check)?;
    set("seed", a.seed, &mut base.seed, check)?;
    set("eval-every", a.eval_every, &mut base.eval_every, check)?;
    set("save-every", a.save_every, &mut base.save_every, check)?;
    let grow_at = a.grow_at.iter().map(|g| g.parse()).collect::<Result<Vec<GrowthPoint>>>()?;
    set("grow-at", (!grow_at.is_empty()).then_some(grow_at), &mut base.grow_at, check)?;
    let stage_lr = a.stage_lr.as_deref().map(str::parse).transpose()?;
    set("stage-lr", stage_lr, &mut base.stage_lr, check)?;
    // A resumed run may turn freezing on (train_resume_with), so it is no contradiction there.
    if a.freeze_old && check.is_none() {
        base.freeze_old = true;
    }
    Ok(())
}

/// First SIGINT/SIGTERM: set `stop` (the run finishes cleanly: save and exit). A second one
/// exits at once.
fn stop_on_signals(stop: &Arc<AtomicBool>) -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| Error::invalid(format!("cannot install the signal handler: {e}")))?;
    }
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let control = TrainControl::default();
    stop_on_signals(&control.stop)?;
    let (dir, start, summary) = match &a.resume {
        Some(dir) => {
            if let Some(out) = &a.out {
                if out != dir {
                    return Err(Error::invalid(
                        "--out contradicts --resume: a resumed run stays in its directory",
                    ));
                }
            }
            let options = ResumeOptions {
                freeze_old: a.freeze_old,
                steps: a.steps,
                stage_lr: a.stage_lr.as_deref().map(str::parse).transpose()?,
            };
            let plan = resume_plan(dir, &options)?;
            let (mut saved, step) = (plan.settings, plan.step);
            apply_train_flags(&a, &mut saved, Some(dir))?;
            if step >= saved.steps {
                eprintln!(
                    "nothing to train: the run in {} is complete (step {step} of {}; --steps N \
                     trains it on to step N)",
                    dir.display(),
                    saved.steps
                );
                return Ok(());
            }
            // The data paths come from the run directory: say what will be read.
            match plan.extends {
                Some(before) => eprintln!(
                    "extending {} from {before} to {} steps (a new stage from step {step}), \
                     reading {}",
                    dir.display(),
                    saved.steps,
                    describe_data(&saved)
                ),
                None => eprintln!(
                    "resuming {} at step {step} of {}, reading {}",
                    dir.display(),
                    saved.steps,
                    describe_data(&saved)
                ),
            }
            (dir.clone(), step, train_resume_options(dir, device, control, &options)?)
        }
        None => {
            let mut settings = TrainSettings::default();
            if let Some(ckpt) = &a.init_from {
                settings.start_from(ckpt)?;
            }
            apply_train_flags(&a, &mut settings, None)?;
            let dir = a.out.clone().unwrap_or_else(|| default_run_dir(&settings));
            // Held until the run has started (train_new takes it again, reentrantly).
            let mut _lock = None;
            if a.overwrite && dir.exists() {
                settings.validate()?;
                settings.model_config()?;
                let lock = RunLock::acquire(&dir)?;
                clear_unfinished(&lock)?;
                _lock = Some(lock);
            }
            check_new_run(&dir, &settings)?;
            eprintln!("run directory: {}", dir.display());
            (dir.clone(), 0, train_new(&dir, settings, device, control)?)
        }
    };
    if summary.interrupted {
        eprintln!("resume with: tokenformer train --resume {}", dir.display());
        return Ok(());
    }
    let ran = summary.step - start;
    match (summary.last_loss, summary.last_val_loss) {
        (Some(loss), Some(val)) => eprintln!(
            "finished {ran} step{} (now at step {} of {}) in {:.1} s: train loss {loss:.4}, \
             validation loss {val:.4}",
            if ran == 1 { "" } else { "s" },
            summary.step,
            summary.steps,
            summary.seconds
        ),
        _ => eprintln!(
            "nothing to train: the run is complete (step {} of {})",
            summary.step, summary.steps
        ),
    }
    eprintln!("checkpoint, metrics.jsonl and loss.png are in {}", dir.display());
    if a.sample_tokens > 0 {
        let model = load_model(&dir, device)?;
        eprintln!("--- sample ---");
        sample(&model, DEFAULT_PROMPT, a.sample_tokens, DEFAULT_TEMPERATURE, None, 0)?;
        println!();
    }
    Ok(())
}

/// The data a run reads, in words, e.g. `a.txt, books/ (validation: the last 10% of them)`.
fn describe_data(s: &TrainSettings) -> String {
    let list = |paths: &[PathBuf]| -> String {
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    };
    let train =
        if s.data.is_empty() { "the built-in tiny shakespeare".to_string() } else { list(&s.data) };
    let val = if s.val_data.is_empty() {
        format!("the last {}% of it", s.val_fraction * 100.0)
    } else {
        list(&s.val_data)
    };
    format!("{train} (validation: {val})")
}

fn tokenizer_of(model: &TokenFormer) -> Result<Tokenizer> {
    Tokenizer::from_name(&model.config.tokenizer)
}

/// Streams a sample to stdout.
fn sample(
    model: &TokenFormer,
    prompt: &str,
    max_tokens: usize,
    temperature: f32,
    top_k: Option<usize>,
    seed: u64,
) -> Result<()> {
    let tokenizer = tokenizer_of(model)?;
    let prompt_ids = tokenizer.encode(prompt)?;
    let mut decoder = StreamDecoder::new(tokenizer);
    let mut stdout = std::io::stdout().lock();
    let write_err = |e: std::io::Error| Error::io("stdout", e);
    write!(stdout, "{prompt}").map_err(write_err)?;
    let opts = SampleOptions { max_tokens, temperature, top_k, seed };
    generate(model, &prompt_ids, &opts, |id| {
        write!(stdout, "{}", decoder.push(id)).map_err(write_err)?;
        stdout.flush().map_err(write_err)
    })?;
    write!(stdout, "{}", decoder.finish()).map_err(write_err)?;
    stdout.flush().map_err(write_err)
}

fn generate_text(a: GenerateArgs) -> Result<()> {
    if a.prompt.is_empty() {
        return Err(Error::invalid("--prompt must not be empty"));
    }
    if a.top_k == Some(0) {
        return Err(Error::invalid(
            "--top-k must be at least 1 (leave it out to sample from the whole vocabulary)",
        ));
    }
    let model = load_model(&a.checkpoint, parse_device(&a.device)?)?;
    sample(&model, &a.prompt, a.max_tokens, a.temperature, a.top_k, a.seed)?;
    println!();
    Ok(())
}

fn grow(a: GrowArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let init: GrowInit = a.init.parse().map_err(|e| Error::invalid(format!("--init: {e}")))?;
    let layer_at: LayerPlacement =
        a.layer_at.parse().map_err(|e| Error::invalid(format!("--layer-at: {e}")))?;
    let tau: TauRule = a.tau.parse().map_err(|e| Error::invalid(format!("--tau: {e}")))?;
    let spec = match &a.to_preset {
        Some(name) => {
            let from = load_model(&a.checkpoint, Device::Cpu)?.config;
            let spec = GrowSpec::to_preset(&from, name, layer_at, init, a.seed)
                .map_err(|e| Error::invalid(format!("grow: {}: {e}", a.checkpoint.display())))?;
            GrowSpec { tau, ..spec }
        }
        None => GrowSpec {
            qkv: a.qkv,
            proj: a.proj,
            ffn: a.ffn,
            layers: a.layers,
            layer_at,
            init,
            seed: a.seed,
            tau,
        },
    };
    // Held through the grow (grow_checkpoint takes it again, reentrantly).
    let mut _lock = None;
    if a.overwrite && a.out.exists() {
        let lock = RunLock::acquire(&a.out)?;
        clear_unfinished(&lock)?;
        _lock = Some(lock);
    }
    let report = grow_checkpoint(&a.checkpoint, &a.out, &spec, device)?;
    let mut counts: Vec<String> = TokenGroup::ALL
        .iter()
        .map(|g| format!("{} {} -> {}", g.name(), g.counts(&report.from).0, g.counts(&report.to).0))
        .collect();
    counts.push(format!("layers {} -> {}", report.from.n_layers, report.to.n_layers));
    println!(
        "grew {} -> {}: {}; parameters {} -> {}",
        a.checkpoint.display(),
        a.out.display(),
        counts.join(", "),
        thousands(report.from.param_count()),
        thousands(report.to.param_count())
    );
    if report.preserves_outputs {
        println!("exact growth: the grown model computes the same outputs as the original");
    } else if report.changed_tau {
        let taus: Vec<String> = TokenGroup::ALL
            .iter()
            .map(|g| format!("{} √{}", g.name(), g.counts(&report.to).1))
            .collect();
        println!(
            "τ follows the token count ({}): the model's outputs change (not output-preserving)",
            taus.join(", ")
        );
    } else if init == GrowInit::Random {
        println!(
            "random init: the new parameters change the model's outputs (not output-preserving)"
        );
    } else {
        println!("the softmax normalisation cannot grow in width exactly: the model's outputs change (not output-preserving)");
    }
    if report.had_optimizer {
        if spec.restarts_optimizer() {
            println!("optimizer moments reset to zero");
        } else {
            println!("optimizer moments extended with zeros for the new tokens and layers");
        }
    }
    Ok(())
}

fn init(a: InitArgs) -> Result<()> {
    let mut config = a.arch.apply(&ModelConfig::preset(&a.preset)?)?;
    if let Some(v) = a.vocab_size {
        config.vocab_size = v;
    }
    if let Some(norm) = &a.norm {
        if config.arch != Arch::TokenFormer {
            return Err(Error::invalid("--norm sets the Θ of Pattentions; a transformer has none"));
        }
        config.norm = norm.parse::<Theta>()?;
    }
    config.validate()?;
    let sizes = a.arch.sizes().flags();
    let name = if sizes.is_empty() {
        a.preset.clone()
    } else {
        format!("{} {}", a.preset, sizes.join(" "))
    };
    memory::check(
        &format!("initialising {name} with vocab_size {}", config.vocab_size),
        memory::checkpoint_bytes(&config, false),
    )?;
    let refuse = |out: &Path| -> Result<()> {
        if is_checkpoint_dir(out) {
            return Err(Error::invalid(format!(
                "{} already holds a checkpoint; choose another --out",
                out.display()
            )));
        }
        Ok(())
    };
    refuse(&a.out)?;
    let _lock = RunLock::create_and_acquire(&a.out)?;
    refuse(&a.out)?;
    let model = TokenFormer::init(&config, a.seed, Device::Cpu)?;
    save_checkpoint(
        &a.out,
        &Checkpoint {
            config: config.clone(),
            params: model.named_tensors(),
            optimizer: None,
            train_state: None,
        },
    )?;
    println!(
        "wrote {} {} ({} parameters, seed {}) to {}",
        name,
        config.arch,
        thousands(config.param_count()),
        a.seed,
        a.out.display()
    );
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let config = match (&a.preset, &a.checkpoint) {
        (Some(p), _) => a.arch.apply(&ModelConfig::preset(p)?)?,
        (None, Some(dir)) => {
            if a.arch.arch.is_some() || a.arch.d_ff.is_some() || !a.arch.sizes().is_empty() {
                return Err(Error::invalid(
                    "--arch, --d-ff and the size flags go with --preset; a checkpoint's \
                     config.json has its model",
                ));
            }
            // The config and the model file's header: counting needs no tensor.
            inspect_checkpoint(dir)?.config
        }
        (None, None) => return Err(Error::invalid("give --preset NAME or --checkpoint DIR")),
    };
    // The counts below are computed from the flags: refuse what they cannot count.
    config.validate()?;
    let json = serde_json::to_string_pretty(&config).map_err(|e| Error::invalid(e.to_string()))?;
    println!("{json}");
    let preset = ModelConfig::preset_names()
        .into_iter()
        .find(|name| ModelConfig::preset(name).is_ok_and(|p| p == config));
    if let Some(name) = preset {
        let released = RELEASED.iter().find(|(n, _)| *n == name);
        let what = released.map(|(_, what)| format!(" (the released {what})")).unwrap_or_default();
        println!("{:>26}: {name}{what}", "preset");
    }
    for (name, n) in config.param_breakdown() {
        println!("{name:>26}: {:>15}", thousands(n));
    }
    println!("{:>26}: {:>15}", "total parameters", thousands(config.param_count()));
    let t = config.max_seq_len;
    let flops = config.train_flops_per_token(t);
    println!("{:>26}: {:>15}", "training FLOPs per token", thousands(flops as usize));
    println!(
        "{:>26}  (6 x {} matmul parameters + 12·L·d·T at T = {t}, attention counted non-causally)",
        "",
        thousands(config.matmul_params())
    );
    Ok(())
}

fn import(a: ImportArgs) -> Result<()> {
    let norm = a.norm.as_deref().map(str::parse::<Theta>).transpose()?;
    let config = match &a.config {
        Some(path) => Some(read_config_file(path)?),
        None => None,
    };
    let opts = ImportOptions {
        heads: a.heads,
        max_seq_len: a.max_seq_len,
        tokenizer: a.tokenizer.clone(),
        norm,
        config,
    };
    let report = import_checkpoint(&a.src, &a.out, &opts)?;
    let c = &report.config;
    match report.recognised {
        Some((name, what)) => println!("recognised the released {what} (preset {name})"),
        None => println!("no released config has these shapes; settings from the flags"),
    }
    println!(
        "imported {} ({}) -> {}: L {}, d {}, H {}, V {}, qkv {}, proj {}, ffn {}, T {}, {}, \
         tokenizer {}; {} parameters",
        a.src.display(),
        report.source,
        a.out.display(),
        c.n_layers,
        c.d_model,
        c.n_heads,
        c.vocab_size,
        c.qkv_tokens,
        c.proj_tokens,
        c.ffn_tokens,
        c.max_seq_len,
        c.norm.name(),
        c.tokenizer,
        thousands(c.param_count())
    );
    Ok(())
}

/// A config.json given on the command line, read and checked like a checkpoint's.
fn read_config_file(path: &Path) -> Result<ModelConfig> {
    let bytes = read_regular(path, 1 << 20, "a config.json")?;
    parse_config_json(path, &bytes)
}

fn eval(a: EvalArgs) -> Result<()> {
    if let Some(path) = &a.per_token {
        per_token_format(path)?;
        if path.exists() || path.is_symlink() {
            return Err(Error::invalid(format!(
                "--per-token: {} exists; name a new file (nothing is overwritten)",
                path.display()
            )));
        }
    }
    let model = load_model(&a.checkpoint, parse_device(&a.device)?)?;
    let ids = match (&a.text, &a.tokens) {
        (Some(text), _) => text_token_ids(text, tokenizer_of(&model)?)?,
        (None, Some(tokens)) => read_token_ids(tokens)?,
        (None, None) => return Err(Error::invalid("give --text FILE or --tokens FILE")),
    };
    // A bar on stderr (hidden when stderr is not a terminal), so `--json` stdout stays one line.
    let windows = ids.len().div_ceil(model.config.max_seq_len) as u64;
    let bar = Progress::new(windows, 0);
    let progress = |done: usize, _| bar.set_position(done as u64);
    let result = match &a.per_token {
        Some(_) => evaluate_tokens_per_position(&model, &ids, progress)?,
        None => evaluate_tokens(&model, &ids, progress)?,
    };
    bar.clear();
    if let (Some(path), Some(losses)) = (&a.per_token, &result.per_position) {
        write_per_token(path, &ids[1..], losses, result.loss)?;
    }
    let loss = result.loss as f32;
    if a.json {
        println!("{}", serde_json::json!({ "loss": loss, "tokens": result.tokens }));
    } else {
        println!(
            "loss {loss} over {} predicted tokens (perplexity {:.3})",
            result.tokens,
            result.loss.exp()
        );
    }
    Ok(())
}

/// Whether `--per-token FILE` asks for JSON (`true`) or safetensors (`false`).
fn per_token_format(path: &Path) -> Result<bool> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Ok(true),
        Some("safetensors") => Ok(false),
        _ => Err(Error::invalid(format!(
            "--per-token: {} must end in .json or .safetensors",
            path.display()
        ))),
    }
}

/// The per-position losses of `eval --per-token`: `targets[i]` is the id predicted at position
/// i (the stream's id i + 1) and `losses[i]` its loss. JSON: `{"loss", "tokens", "targets",
/// "losses"}`; safetensors: F32 tensors `targets` and `losses`, both [N] (ids up to 2²⁴ are
/// exact in f32).
fn write_per_token(path: &Path, targets: &[u32], losses: &[f32], mean: f64) -> Result<()> {
    let bytes = if per_token_format(path)? {
        let json = serde_json::json!({
            "loss": mean,
            "tokens": losses.len(),
            "targets": targets,
            "losses": losses,
        });
        let mut text = json.to_string();
        text.push('\n');
        text.into_bytes()
    } else {
        let n = losses.len();
        let ids: Vec<f32> = targets.iter().map(|&t| t as f32).collect();
        let tensors = vec![
            ("targets".to_string(), tokenformer_core::Tensor::from_vec(ids, &[n])?),
            ("losses".to_string(), tokenformer_core::Tensor::from_vec(losses.to_vec(), &[n])?),
        ];
        tokenformer_core::safetensors_io::write_safetensors(Vec::new(), path, &tensors)?
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::invalid(format!("--per-token: {} is not a file name", path.display()))
    })?;
    replace_file(dir, name, &bytes)
}

fn read_token_ids(path: &Path) -> Result<Vec<u32>> {
    let (file, len) = open_regular(path)?;
    // The text, then up to one id (4 bytes) per two bytes of it.
    memory::check(
        &format!("reading {} ({}) as token ids", path.display(), bytes_text(len)),
        Some(3 * u128::from(len)),
    )?;
    let bytes = read_open(file, path, len, len, "a file of token ids")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::format(path.display(), "not UTF-8 text of token ids"))?;
    parse_token_ids(&text, &path.display().to_string())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let tokenizer = Tokenizer::from_name(&a.tokenizer)?;
    let ids = text_token_ids(&a.file, tokenizer)?;
    match &a.out {
        Some(out) => {
            save_token_ids(out, &ids)?;
            eprintln!(
                "wrote {} token ids ({} tokenizer) to {}",
                thousands(ids.len()),
                tokenizer.name(),
                out.display()
            );
            Ok(())
        }
        None => write_token_ids(&mut std::io::stdout().lock(), &ids, "stdout"),
    }
}

/// The `--profile` table: milliseconds per step for each op, forward and backward.
fn print_profile(
    rows: &[tokenformer_models::bench::ProfileRow],
    step_seconds: f64,
    device: Device,
) {
    println!("profile, per step (ms):");
    if device.is_cuda() {
        println!("  (CUDA runs asynchronously: op times are launch times, the step is exact)");
    }
    println!("  {:<22} {:>9} {:>9} {:>9} {:>7}", "op", "forward", "backward", "total", "share");
    for row in rows {
        let (f, b) = (row.forward_seconds * 1e3, row.backward_seconds * 1e3);
        println!(
            "  {:<22} {:>9.2} {:>9.2} {:>9.2} {:>6.1}%",
            row.name,
            f,
            b,
            f + b,
            row.share * 100.0
        );
    }
    println!("  {:<22} {:>9} {:>9} {:>9.2} {:>6.1}%", "step", "", "", step_seconds * 1e3, 100.0);
}

fn bench(a: BenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let config = a.arch.apply(&ModelConfig::preset(&a.preset)?)?;
    let shape = MatmulShape::parse(&a.matmul)?;
    let (m, k, n) = (shape.m as u128, shape.k as u128, shape.n as u128);
    let operands = if a.matmul_backward { 2 } else { 1 };
    memory::check(
        &format!("bench --matmul {}", a.matmul),
        m.checked_mul(k)
            .zip(k.checked_mul(n))
            .zip(m.checked_mul(n))
            .and_then(|((ak, kn), mn)| ak.checked_add(kn)?.checked_add(mn))
            .and_then(|values| values.checked_mul(operands * 4)),
    )?;
    if a.steps > 0 {
        memory::check_training(&config, a.batch, a.seq, 1)?;
    }
    let cpu = if device.is_cuda() { None } else { Some(cpu_info()?) };
    let matmul = if shape.is_empty() {
        None
    } else {
        Some(bench_matmul(shape, a.matmul_backward, 5, device)?)
    };
    let train = if a.steps > 0 {
        let r =
            bench_train(&a.preset, &config, a.batch, a.seq, a.steps, device, a.tf32, a.profile)?;
        Some(match &cpu {
            Some(cpu) => r.with_peak(cpu.peak_gflops_all_threads / 1e3),
            None => r,
        })
    } else {
        None
    };
    // The share of the peak on the threads the product ran on.
    let of_peak = |gflops: f64| cpu.as_ref().map(|c| gflops / c.peak_gflops_all_threads);
    if a.json {
        let mut v = match &train {
            Some(r) => serde_json::to_value(r).map_err(|e| Error::invalid(e.to_string()))?,
            None => serde_json::json!({ "device": device.to_string() }),
        };
        if let Some(cpu) = &cpu {
            v["cpu"] = serde_json::to_value(cpu).map_err(|e| Error::invalid(e.to_string()))?;
        }
        if let Some(mm) = &matmul {
            v["matmul_gflops"] = serde_json::json!(mm.gflops);
            v["matmul_size"] = serde_json::json!(mm.shape.m);
            v["matmul_shape"] = serde_json::json!([mm.shape.m, mm.shape.k, mm.shape.n]);
            v["matmul_peak_fraction"] = serde_json::json!(of_peak(mm.gflops));
            if let Some(g) = mm.backward_gflops {
                v["matmul_backward_gflops"] = serde_json::json!(g);
                v["matmul_backward_peak_fraction"] = serde_json::json!(of_peak(g));
            }
        }
        println!("{v}");
        return Ok(());
    }
    match (&train, &cpu) {
        (Some(r), _) => println!("device: {} ({})", r.device, r.device_name),
        (None, Some(c)) => println!("device: cpu ({})", c.processor),
        (None, None) => println!("device: {device}"),
    }
    if let Some(c) = &cpu {
        let kib = |bytes: usize| {
            if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
                format!("{} MiB", bytes >> 20)
            } else {
                format!("{} KiB", bytes >> 10)
            }
        };
        println!(
            "cpu: {} threads, vector unit {} ({} lanes), caches per core L1d {} L2 {} L3 {} ({})",
            c.threads,
            c.vector_isa,
            c.vector_lanes,
            kib(c.l1d_bytes),
            kib(c.l2_bytes),
            kib(c.l3_bytes),
            c.cache_source
        );
        match &c.gemm_blocking {
            Some(b) => println!(
                "  GEMM blocking        tile {}x{}, KC {}, MC {}, NC {}",
                b.mr, b.nr, b.kc, b.mc, b.nc
            ),
            None => println!("  GEMM blocking        reference GEMM (matrixmultiply)"),
        }
        println!(
            "  fp32 peak            {:.1} GFLOP/s on 1 thread, {:.1} on {} (FMA loop)",
            c.peak_gflops_one_thread, c.peak_gflops_all_threads, c.threads
        );
    }
    if let Some(mm) = &matmul {
        let share = |gflops: f64| match of_peak(gflops) {
            Some(f) => format!(", {:.1}% of peak", f * 100.0),
            None => String::new(),
        };
        println!(
            "matmul {}: {:.2} ms, {:.1} GFLOP/s{}",
            mm.shape,
            mm.seconds * 1e3,
            mm.gflops,
            share(mm.gflops)
        );
        if let (Some(s), Some(g)) = (mm.backward_seconds, mm.backward_gflops) {
            println!("  backward (G·Bᵀ, Aᵀ·G): {:.2} ms, {:.1} GFLOP/s{}", s * 1e3, g, share(g));
        }
    }
    let Some(r) = train else { return Ok(()) };
    println!(
        "train step, preset {} ({} params), batch {} x seq {}{}:",
        r.preset,
        thousands(r.params),
        r.batch,
        r.seq,
        if r.tf32 { ", tf32" } else { "" }
    );
    println!(
        "  step time            {:.2} ms (forward+backward {:.2} ms)",
        r.step_seconds * 1e3,
        r.forward_backward_seconds * 1e3
    );
    println!("  tokens/s             {:.0}", r.tokens_per_sec);
    println!(
        "  model TFLOP/s        {:.3} (SPEC §2 FLOPs, attention counted non-causally)",
        r.model_tflops
    );
    match (r.peak_tflops, r.mfu) {
        (Some(peak), Some(mfu)) if device.is_cuda() => println!(
            "  MFU                  {:.1}% of {peak} TFLOP/s ({})",
            mfu * 100.0,
            r.device_name
        ),
        (Some(peak), Some(mfu)) => println!(
            "  MFU                  {:.1}% of the measured fp32 peak, {:.1} GFLOP/s",
            mfu * 100.0,
            peak * 1e3
        ),
        _ => println!("  MFU                  n/a (no peak known for {})", r.device_name),
    }
    println!("  peak memory          {:.1} MiB", r.peak_memory_bytes as f64 / (1024.0 * 1024.0));
    if let Some(rows) = &r.profile {
        print_profile(rows, r.step_seconds, device);
    }
    Ok(())
}

fn growth_experiment(a: GrowthExperimentArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let scale = if a.quick { Scale::Quick } else { a.scale.parse()? };
    if a.quick && a.scale != "small" {
        return Err(Error::invalid("--quick is a scale of its own; leave out --scale"));
    }
    let plan = Plan {
        seed: a.seed,
        seeds: a.seeds,
        tune_lr: a.tune_lr,
        data_dir: a.data_dir,
        growths: a.growths,
        base_share: a.base_share,
        stage_lr: a.stage_lr.parse()?,
        tau_control: a.tau_control,
        only_arms: a.arms,
        ..Plan::new(scale)
    };
    // Bad flags and a missing data folder fail before any directory is made.
    plan.check()?;
    let out = a.out.unwrap_or_else(default_experiment_dir);
    let control = ExperimentControl::default();
    stop_on_signals(&control.stop)?;
    let Some(results) = run_growth_experiment(&out, &plan, device, control)? else {
        return Err(Error::invalid(format!(
            "experiment growth was stopped before it finished: the same command with --out {} \
             continues it",
            out.display()
        )));
    };
    println!("{}", results_table(&results));
    println!(
        "target (scratch's mean final validation loss) {:.4}; results.md, results.json and \
         loss_vs_flops.png are in {}",
        results.target_val_loss,
        out.display()
    );
    Ok(())
}

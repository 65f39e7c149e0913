//! `cal-grpo distill`: a student trained toward a frozen teacher on a dataset's
//! solutions (logit, attention or feature strategy), on the SFT harness (checkpoints
//! and `--resume`, `metrics.jsonl`, TensorBoard, a held-out curve with the KL to the
//! teacher), the student exported as a Hugging Face folder into the run folder.

use crate::config::{self, LoraFlags, PlacementFlags};
use crate::source::Source;
use anyhow::{bail, Context, Result};
use cal_core::data;
use cal_model::load;
use cal_train::collective::Collective;
use cal_train::config::RunConfig;
use cal_train::distill::{check_same_tokenizer, layer_map, parse_layers, Distiller, Strategy};
use cal_train::policy::{PolicySource, PromptFormat};
use cal_train::rundir::Start;
use cal_train::sft::{RunSpec, SftConfig, SftHarness, SftRun};
use cal_train::tiny::TinySpec;
use cal_train::trainer::RunEnd;
use clap::Args;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

/// Flags of `cal-grpo distill`. Each sets one key of the run configuration (its clap id).
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct DistillArgs {
    /// TOML file in the nested schema (`[distill] alpha = 0.7`); flags win.
    #[arg(long, value_name = "FILE.toml")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit (feed it back with --config).
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Continue from the latest checkpoint in --output-dir.
    #[arg(long, conflicts_with = "overwrite")]
    #[serde(skip)]
    pub resume: bool,
    /// Start over in an --output-dir that holds another run (moved aside, not deleted).
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,
    /// The teacher: a Hugging Face folder, a `.gguf` file or `random:CONFIG.json`.
    #[arg(long, id = "distill.teacher")]
    pub teacher: Option<String>,
    /// The student: any model the project loads, `random:CONFIG.json` for random
    /// weights of a shape.
    #[arg(long, id = "model.name", conflicts_with = "distill.student-layers")]
    pub student: Option<String>,
    /// The student as the teacher with these layers kept, e.g. `0,3,6,9` (DistilBERT's
    /// initialisation).
    #[arg(long, id = "distill.student-layers")]
    pub student_layers: Option<String>,
    /// logit, attention or feature.
    #[arg(long, id = "distill.strategy", value_enum)]
    pub strategy: Option<Strategy>,
    /// Softmax temperature τ of the logit strategy (the KL is scaled by τ²).
    #[arg(long, id = "distill.temperature")]
    pub distill_temperature: Option<f64>,
    /// Weight α of the distillation term; the solutions' cross-entropy gets 1 − α.
    #[arg(long, id = "distill.alpha")]
    pub distill_alpha: Option<f64>,
    /// Student:teacher layer pairs of the attention and feature strategies, e.g.
    /// `0:0,1:4` [default: the kept layers, else spread evenly].
    #[arg(long, id = "distill.layer-map")]
    pub layer_map: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: PlacementFlags,
    /// GSM8K-format training file (`generated` for the embedded problems).
    #[arg(long, id = "data.dataset")]
    pub dataset: Option<String>,
    /// Training problems, drawn with --seed; -1 uses the whole dataset.
    #[arg(long, id = "data.num-samples", allow_negative_numbers = true)]
    pub num_samples: Option<i64>,
    /// Optimizer steps.
    #[arg(long, id = "distill.steps")]
    pub steps: Option<usize>,
    /// Examples per step.
    #[arg(long, id = "distill.batch-size")]
    pub batch_size: Option<usize>,
    /// Peak learning rate, with a linear warmup over the first tenth.
    #[arg(long, id = "distill.learning-rate")]
    pub learning_rate: Option<f64>,
    /// Padded tokens per forward/backward (0 = whole batches).
    #[arg(long, id = "distill.micro-batch-tokens")]
    pub micro_batch_tokens: Option<usize>,
    /// Held-out data (default: the dataset's held-out part, or `test.jsonl` beside it).
    #[arg(long, id = "data.eval-dataset")]
    pub eval_dataset: Option<String>,
    /// Held-out problems evaluated (-1 = all).
    #[arg(long, id = "data.eval-samples", allow_negative_numbers = true)]
    pub eval_samples: Option<i64>,
    /// Held-out greedy accuracy and KL to the teacher every N steps, before the first
    /// and after the last (0 = none).
    #[arg(long, id = "eval.every")]
    pub eval_every: Option<usize>,
    /// Most tokens generated per held-out answer.
    #[arg(long, id = "rollout.max-new-tokens")]
    pub max_new_tokens: Option<usize>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, id = "checkpoint.save-every")]
    pub save_every: Option<usize>,
    /// Data parallel: compare the ranks' weight checksums every this many steps (0 =
    /// never).
    #[arg(long, id = "run.weight-check-every")]
    pub weight_check_every: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: config::PromptFlags,
    /// The run folder: checkpoints, logs, and the student as a Hugging Face folder
    /// [default: runs/distill].
    #[arg(long, id = "run.output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Data order and the projections' initialisation.
    #[arg(long, id = "run.seed")]
    pub seed: Option<u64>,
}

/// `distill`'s own defaults, below a `--config` file.
pub fn defaults() -> serde_json::Value {
    json!({"run": {"output-dir": "runs/distill"}, "eval": {"every": 0}, "checkpoint": {"save-every": 50}})
}

impl DistillArgs {
    /// Defaults → model profile → `distill`'s own defaults → `--config` → flags.
    pub fn resolve(&self) -> Result<RunConfig> {
        let layer = config::flag_layer(self)?;
        RunConfig::resolve_layers(self.config.as_deref(), &defaults(), &layer)
    }
}

/// The loop's recipe from the `[distill]` section.
fn recipe(cfg: &RunConfig) -> SftConfig {
    let d = &cfg.distill;
    let mut r = SftConfig::of_run(cfg);
    r.steps = d.steps;
    r.batch_size = d.batch_size;
    r.optim.lr = d.learning_rate;
    r.optim.warmup_steps = d.steps / 10;
    r.micro_batch_tokens = d.micro_batch_tokens;
    r
}

/// `ranks`: the processes of a data-parallel run (one by default): each takes an equal
/// share of every batch; rank 0 writes, evaluates and exports.
pub fn run(args: &DistillArgs, ranks: std::sync::Arc<dyn Collective>) -> Result<()> {
    let cfg = args.resolve()?;
    if args.print_config {
        return crate::train::print_config(&cfg);
    }
    let d = &cfg.distill;
    if d.teacher.is_empty() {
        bail!(
            "distill needs --teacher (a Hugging Face folder, a .gguf file or random:CONFIG.json)"
        );
    }
    let kept = (!d.student_layers.trim().is_empty())
        .then(|| parse_layers(&d.student_layers, "--student-layers"))
        .transpose()?;
    if kept.is_none() && args.student.is_none() && cfg.model.name == "tiny" {
        bail!("distill needs a student: --student MODEL, or --student-layers 0,3,6 to keep some of the teacher's layers");
    }
    let placement = cfg.model.placement();
    let load = |name: &str, flag: &str| {
        // rank 0 first: a `tiny` it makes is in the cache when the others load it
        cal_train::collective::main_first(ranks.as_ref(), || {
            Source::new(name, placement)
                .fresh()
                .with_context(|| format!("{flag} {name}: cannot load it"))
        })
    };
    let teacher = load(&d.teacher, "--teacher")?;
    let (student_name, mut student) = match &kept {
        Some(k) => {
            let mut s = load(&d.teacher, "--teacher")?;
            s.model = teacher.model.keep_layers(k)?;
            (format!("{} layers {}", d.teacher, d.student_layers), s)
        }
        None => match cfg.model.name.strip_prefix("random:") {
            // random weights of a shape speak the teacher's vocabulary
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--student random:{path}: reading it"))?;
                let mc = cal_model::ModelConfig::from_hf_json(&text, std::path::Path::new(path))?;
                let (dev, dtype) = placement.resolve()?;
                let model = cal_model::Transformer::init_random(mc, cfg.run.seed, dtype, &dev)?;
                let tok = load(&d.teacher, "--teacher")?.tok;
                (
                    cfg.model.name.clone(),
                    cal_train::policy::Policy::new(model, tok),
                )
            }
            None => (cfg.model.name.clone(), load(&cfg.model.name, "--student")?),
        },
    };
    check_same_tokenizer((&d.teacher, &teacher.tok), (&student_name, &student.tok))?;
    if student.model.cfg.vocab_size != teacher.model.cfg.vocab_size {
        bail!(
            "the teacher ({}) has {} logits per token, the student ({student_name}) {}: \
             distillation needs one vocabulary",
            d.teacher,
            teacher.model.cfg.vocab_size,
            student.model.cfg.vocab_size
        );
    }
    let map = layer_map(
        &d.layer_map,
        kept.as_deref(),
        student.model.cfg.num_hidden_layers,
        teacher.model.cfg.num_hidden_layers,
    )?;
    let out = cfg.output_dir();
    let examples = if cfg.data.dataset == "generated" {
        TinySpec::default().splits().0
    } else {
        data::sets::load_part(&cfg.data.dataset, data::sets::Split::Train)?.examples
    };
    let prompt = PromptFormat::of(&cfg.data, &examples)?;
    let examples = data::select(examples, cfg.data.num_samples, Some(cfg.run.seed));
    let held_out = if cfg.eval.every > 0 {
        crate::source::datasets(&cfg)?.1
    } else {
        Vec::new()
    };
    let params = |m: &cal_model::Transformer| {
        m.params.values().map(|t| t.elem_count()).sum::<usize>() as f64 / 1e6
    };
    if ranks.is_main() {
        eprintln!(
        "distill ({:?}, α {}, τ {}): student {student_name} ({:.1}M parameters, {} layers) from \
         teacher {} ({:.1}M, {} layers){}; {} steps × {} examples from {} problems; output {}",
        d.strategy,
        d.alpha,
        d.temperature,
        params(&student.model),
        student.model.cfg.num_hidden_layers,
        d.teacher,
        params(&teacher.model),
        teacher.model.cfg.num_hidden_layers,
        if d.strategy == Strategy::Logit {
            String::new()
        } else {
            format!(", layer pairs {map:?}")
        },
        d.steps,
        d.batch_size,
        examples.len(),
        out.display()
    );
    }
    let objective = Distiller::new(teacher.model, &student.model, d, map, cfg.run.seed)?;
    student = student.with_prompt(prompt);
    let harness = SftHarness {
        save_every: cfg.checkpoint.save_every,
        eval_every: cfg.eval.every,
        skip_start_eval: false,
        eval: cal_train::evaluate::EvalConfig::of_run(&cfg),

        weight_check_every: cfg.run.weight_check_every,
    };
    let spec = RunSpec {
        config: &cfg,
        cfg: recipe(&cfg),
        objective: Box::new(objective),
        ranks: ranks.clone(),
    };
    let start = Start::from_flags(args.resume, args.overwrite);
    let mut run = SftRun::with_objective(&out, spec, student, &examples, held_out, harness, start)?;
    let (end, r) = run.run()?;
    if end == RunEnd::Interrupted {
        std::process::exit(130);
    }
    if !ranks.is_main() {
        return Ok(()); // rank 0 exports for the run
    }
    load::export_hf(&run.policy.model, &run.policy.tok, &out)
        .with_context(|| format!("exporting to {}", out.display()))?;
    println!(
        "distill {} steps: loss {:.3} → {:.3} in {:.0}s; student exported to {}",
        r.steps,
        r.first_loss,
        r.last_loss,
        r.seconds,
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        distill: DistillArgs,
    }

    #[test]
    fn distill_flags_reach_their_keys_and_back() {
        let cli = Cli::try_parse_from(["distill"]).unwrap();
        let c = cli.distill.resolve().unwrap();
        assert_eq!(
            (c.distill.strategy, c.distill.alpha, c.distill.temperature),
            (Strategy::Logit, 0.5, 2.0)
        );
        assert_eq!(c.output_dir(), PathBuf::from("runs/distill"));
        let r = recipe(&c);
        assert_eq!((r.steps, r.batch_size, r.optim.lr), (100, 8, 1e-4));
        let cmd = <Cli as clap::CommandFactory>::command();
        config::tests::round_trip(&cmd, &|args| {
            let cli =
                Cli::try_parse_from(std::iter::once("distill".to_string()).chain(args.to_vec()))?;
            cli.distill.resolve()
        });
    }
}

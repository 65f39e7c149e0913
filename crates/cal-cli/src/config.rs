//! Flags of `train` and `experiment`, and the flags shared by every command that loads
//! a model or asks an oracle. The flags are flat names (`--num-generations`); each one is the
//! top layer over a key of the nested run configuration ([`cal_train::config`]). The key
//! is the flag's clap id, written on the flag's own field, so a flag is declared once
//! ([`keyed_flags`] reads the table off the parser).

use anyhow::{bail, Result};
use cal_core::credit::{CreditMode, Estimator};
use cal_model::{DTypeSpec, DeviceSpec, Placement};
use cal_oracle::{OracleSpec, Provider};
use cal_train::algorithm::ppo::{CriticKind, KlPlacement};
use cal_train::algorithm::AlgorithmKind;
use cal_train::config::{RunConfig, Switch};
use cal_train::loss::{Aggregation, Importance};
use clap::{Args, Command};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;

/// `--device` and `--dtype`: on every command that loads a model.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct PlacementFlags {
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, id = "model.device")]
    pub device: Option<DeviceSpec>,
    /// Weights and activations: f32, or bf16/f16 on CUDA.
    #[arg(long, id = "model.dtype", value_enum)]
    pub dtype: Option<DTypeSpec>,
}

impl PlacementFlags {
    pub fn placement(&self) -> Placement {
        Placement {
            device: self.device.unwrap_or_default(),
            dtype: self.dtype.unwrap_or_default(),
        }
    }
}

/// The LoRA flags, shared by `train`, `experiment` and `sft`.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct LoraFlags {
    /// LoRA rank (0 = full fine-tuning).
    #[arg(long, id = "model.lora.rank")]
    pub lora_rank: Option<usize>,
    /// LoRA alpha [default: 2 × rank].
    #[arg(long, id = "model.lora.alpha")]
    pub lora_alpha: Option<f64>,
    /// Comma-separated LoRA target modules.
    #[arg(long, id = "model.lora.targets", value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Dropout on the LoRA input in training forwards, in [0, 1).
    #[arg(long, id = "model.lora.dropout")]
    pub lora_dropout: Option<f64>,
    /// QLoRA: hold the frozen base quantized under the adapters (needs --lora-rank): the
    /// decoder layers' linear weights in q4_0, q4_1 or q8_0 and the embedding and head in
    /// q8_0; keep: a .gguf file's own blocks.
    #[arg(long, id = "model.quantize-base", value_enum)]
    pub quantize_base: Option<cal_train::config::QuantizeBase>,
}

/// `eval --quantize-base`: generate with the base quantized, as a QLoRA run does.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct QuantizeFlags {
    /// Evaluate with the base quantized (the layers' linear weights in q4_0, q4_1 or
    /// q8_0, the embedding and head in q8_0; keep: a .gguf file's own blocks), as a QLoRA
    /// run (`--quantize-base`) generates.
    #[arg(long, id = "model.quantize-base", value_enum)]
    pub quantize_base: Option<cal_train::config::QuantizeBase>,
}

/// The prompt flags, shared by `train`, `experiment`, `sft`, `eval` and `generate`
/// (keys of `[data]`).
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct PromptFlags {
    /// minijinja template of the user turn, with {{ question }} and {{ instruction }}.
    #[arg(long, id = "data.prompt-template", value_name = "TEMPLATE")]
    pub prompt_template: Option<String>,
    /// System prompt (chat models; a paragraph before the prompt for plain ones).
    #[arg(long, id = "data.system-prompt", value_name = "TEXT")]
    pub system_prompt: Option<String>,
    /// The instruction after the question.
    #[arg(long, id = "data.instruction", value_name = "TEXT")]
    pub instruction: Option<String>,
    /// Worked examples from the training split shown before each question.
    #[arg(long, id = "data.few-shot", value_name = "K")]
    pub few_shot: Option<usize>,
    /// Seed that draws the few-shot examples.
    #[arg(long, id = "data.few-shot-seed")]
    pub few_shot_seed: Option<u64>,
}

/// `--max-new-tokens` of `eval` and `generate`: the one completion length
/// (`rollout.max-new-tokens`, its default the rollouts').
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct LengthFlags {
    /// Most new tokens per completion.
    #[arg(long, id = "rollout.max-new-tokens")]
    pub max_new_tokens: Option<usize>,
}

/// The oracle's flags, shared by `train`, `experiment`, `oracle` and `demo`.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct OracleFlags {
    /// Oracle provider.
    #[arg(long, id = "oracle.provider", value_enum)]
    pub api_provider: Option<Provider>,
    /// Model the oracle uses (default: the provider's, gpt-4o-mini or gemini-2.0-flash).
    #[arg(long, id = "oracle.model")]
    pub cal_model: Option<String>,
    /// Base URL of an OpenAI-compatible server for the `openai` oracle.
    #[arg(long, id = "oracle.base-url")]
    pub oracle_base_url: Option<String>,
    /// Stop calling a paid oracle after this many USD (estimated; default: no cap).
    #[arg(long, id = "oracle.max-cost")]
    pub oracle_max_cost: Option<f64>,
    /// Concurrent oracle requests.
    #[arg(long, id = "oracle.concurrency")]
    pub oracle_concurrency: Option<usize>,
    /// Per-request oracle timeout in seconds.
    #[arg(long, id = "oracle.timeout")]
    pub oracle_timeout: Option<f64>,
    /// Degrade the oracle on purpose: `miss=P,shift=P,random=P,false-alarm=P` (drop the
    /// span, move it to a neighbouring step, put it on a random step, blame a correct
    /// response), for measuring how CAL depends on oracle quality.
    #[arg(long, id = "oracle.noise", value_name = "KIND=P,...")]
    pub oracle_noise: Option<String>,
    /// Ask a remote judge N times per request and keep the span most samples agree on.
    #[arg(long, id = "oracle.votes", value_name = "N")]
    pub oracle_votes: Option<usize>,
    /// Sampling temperature of a remote judge (default: 0 for one vote, 0.7 for several).
    #[arg(long, id = "oracle.temperature")]
    pub oracle_temperature: Option<f64>,
    /// Show a remote judge the worked examples before the request (few-shot).
    #[arg(long, id = "oracle.few-shot", value_name = "BOOL")]
    pub oracle_few_shot: Option<bool>,
    /// Ask a remote judge for JSON output (`response_format`).
    #[arg(long, id = "oracle.json-mode", value_name = "BOOL")]
    pub oracle_json_mode: Option<bool>,
}

impl OracleFlags {
    /// The oracle of a one-off request (`oracle`, `demo`): defaults, then these flags.
    pub fn spec(&self) -> Result<OracleSpec> {
        Ok(RunConfig::resolve(None, &flag_layer(self)?)?.oracle)
    }
}

/// Flags of `cal-grpo train` (and `experiment`). Each is optional so that a flag given
/// can be told apart from a value of the `--config` file; `--print-config` shows the
/// values in force.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct TrainArgs {
    /// TOML file in the nested schema (`[rollout] num-generations = 8`); flags win.
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

    /// Start over in an --output-dir that holds another run: that run is moved to
    /// `<output-dir>.replaced-<time>` first (nothing is deleted).
    #[arg(long)]
    #[serde(skip)]
    pub overwrite: bool,

    /// Use CAL: ask the oracle for the first error of each wrong answer and penalise
    /// only those tokens (`--credit span` unless --credit names another span mode).
    #[arg(long)]
    #[serde(skip)]
    pub use_cal: bool,

    /// Number of training problems; -1 uses the whole dataset.
    #[arg(long, id = "data.num-samples", allow_negative_numbers = true)]
    pub num_samples: Option<i64>,
    /// Completions sampled per prompt (the GRPO group size G).
    #[arg(long, id = "rollout.num-generations")]
    pub num_generations: Option<usize>,
    /// Advantage given to each error-span token.
    #[arg(long, id = "credit.negative-reward", allow_negative_numbers = true)]
    pub negative_reward: Option<f64>,
    /// At most this many tokens of a located span are penalised (0 = no cap).
    #[arg(long, id = "credit.max-error-span")]
    pub max_error_span: Option<usize>,
    /// Credit mode [default: outcome, or span with --use-cal].
    #[arg(long, id = "credit.mode", value_enum)]
    pub credit: Option<CreditMode>,
    /// The algorithm: `grpo` (critic-free), `ppo` (a value head, GAE over token rewards,
    /// a clipped value loss) or `dpo` (each group's right and wrong rollouts as pairs).
    #[arg(long, id = "run.algorithm", value_enum)]
    pub algorithm: Option<AlgorithmKind>,
    /// Advantage estimator: grpo, dr-grpo, rloo (groups), reinforce++ (token returns)
    /// or gae (PPO's) [default: grpo, gae with --algorithm ppo].
    #[arg(long, id = "credit.advantage", value_enum)]
    pub advantage: Option<Estimator>,
    /// Discount γ of gae and reinforce++.
    #[arg(long, id = "credit.gamma")]
    pub gamma: Option<f64>,
    /// GAE's λ (0 = one-step TD, 1 = returns minus values).
    #[arg(long, id = "credit.lambda")]
    pub lam: Option<f64>,
    /// PPO's critic: a value head on the policy's trunk (`shared`) or on a copy of
    /// the starting model (`separate`).
    #[arg(long, id = "ppo.critic", value_enum)]
    pub critic: Option<CriticKind>,
    /// Weight of PPO's value loss.
    #[arg(long, id = "ppo.vf-coef")]
    pub vf_coef: Option<f64>,
    /// PPO critic's learning rate as a multiple of the policy's.
    #[arg(long, id = "ppo.value-lr-scale")]
    pub value_lr_scale: Option<f64>,
    /// Clip range of PPO's value update around the old values (0 = unclipped).
    #[arg(long, id = "ppo.value-clip")]
    pub value_clip: Option<f64>,
    /// Whiten PPO's advantages over the batch (`true` or `false`).
    #[arg(long, id = "ppo.whiten")]
    pub whiten_advantages: Option<bool>,
    /// Where PPO puts the KL to the reference: in the loss (as GRPO) or as a per-token
    /// reward penalty (classic RLHF PPO).
    #[arg(long, id = "ppo.kl", value_enum)]
    pub kl_placement: Option<KlPlacement>,
    /// β of online DPO (`--algorithm dpo`; `--beta` is the KL weight).
    #[arg(long, id = "dpo.beta")]
    pub dpo_beta: Option<f64>,
    /// The preference loss of online DPO: sigmoid, ipo or orpo.
    #[arg(long, id = "dpo.loss", value_enum)]
    pub dpo_loss: Option<cal_train::preference::PrefLoss>,
    /// The teacher of on-policy distillation (`--algorithm on-policy-distill`): a
    /// Hugging Face folder or `.gguf` file of the policy's vocabulary.
    #[arg(long, id = "distill.teacher")]
    pub teacher: Option<String>,
    /// Weight of on-policy distillation's token reward log π_T − log π_S beside the
    /// outcome advantages.
    #[arg(long, id = "distill.weight")]
    pub distill_weight: Option<f64>,
    /// Advantage of the tokens before the first error in `--credit prefix`.
    #[arg(long, id = "credit.prefix-reward", allow_negative_numbers = true)]
    pub prefix_reward: Option<f64>,
    /// Random seed for data order, sampling and initialisation.
    #[arg(long, id = "run.seed")]
    pub seed: Option<u64>,
    /// Where checkpoints, logs and results go [default: runs/<kind>-seed<SEED>, kind
    /// baseline or cal (grpo), ppo or cal-ppo].
    #[arg(long, id = "run.output-dir")]
    pub output_dir: Option<PathBuf>,
    /// Policy model: `tiny` (embedded), a Hugging Face folder or a `.gguf` file.
    #[arg(long, id = "model.name")]
    pub model: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub placement: PlacementFlags,
    /// Training data: `generated` (embedded GSM8K-format problems) or a GSM8K
    /// `.jsonl`/`.parquet` file.
    #[arg(long, id = "data.dataset")]
    pub dataset: Option<String>,
    /// Held-out data [default: the generated held-out split, or `test.jsonl` beside a
    /// --dataset file].
    #[arg(long, id = "data.eval-dataset")]
    pub eval_dataset: Option<String>,
    /// Evaluate on at most this many held-out problems (-1 = all). The embedded benchmark
    /// holds out 200 and draws more when asked (the first 200 stay the same).
    #[arg(long, id = "data.eval-samples", allow_negative_numbers = true)]
    pub eval_samples: Option<i64>,
    /// Wording of the generated problems (and of tiny's SFT data).
    #[arg(long, id = "data.style", value_enum)]
    pub style: Option<cal_core::data::Style>,
    /// Arithmetic steps per generated problem.
    #[arg(long, id = "data.steps")]
    pub chain_steps: Option<usize>,
    /// SFT steps of tiny's warm start [default: 400 for stories, 1200 for chains]
    /// (a new value trains and caches a new tiny model).
    #[arg(long, id = "model.tiny.sft-steps")]
    pub sft_steps: Option<usize>,
    /// Chain lengths of tiny's SFT corpus, `K` or `MIN-MAX` [default: --chain-steps]:
    /// one warm start for runs at several K (the RL problems keep --chain-steps).
    #[arg(long, id = "model.tiny.sft-chain-steps")]
    pub sft_chain_steps: Option<String>,
    /// Generated training problems for tiny's SFT and RL [default: 4000].
    #[arg(long, id = "model.tiny.train-problems")]
    pub train_problems: Option<usize>,
    /// Optimizer steps [default: one pass over the training problems].
    #[arg(long, id = "run.steps")]
    pub steps: Option<usize>,
    /// Prompts per step (each gets --num-generations completions).
    #[arg(long, id = "rollout.prompts-per-step")]
    pub prompts_per_step: Option<usize>,
    /// Peak learning rate (cosine decay to --min-lr-ratio of it).
    #[arg(long, id = "optim.learning-rate")]
    pub learning_rate: Option<f64>,
    /// Final learning rate as a fraction of the peak.
    #[arg(long, id = "optim.min-lr-ratio")]
    pub min_lr_ratio: Option<f64>,
    /// Linear warmup steps.
    #[arg(long, id = "optim.warmup-steps")]
    pub warmup_steps: Option<usize>,
    /// AdamW weight decay.
    #[arg(long, id = "optim.weight-decay")]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, id = "optim.max-grad-norm")]
    pub max_grad_norm: Option<f64>,
    /// KL coefficient β (k3 estimator against the frozen reference).
    #[arg(long, id = "loss.beta")]
    pub beta: Option<f64>,
    /// Clip range ε of the surrogate.
    #[arg(long, id = "loss.epsilon")]
    pub epsilon: Option<f64>,
    /// Upper clip range (DAPO's clip-higher) [default: --epsilon].
    #[arg(long, id = "loss.epsilon-high")]
    pub epsilon_high: Option<f64>,
    /// How per-token losses become one number.
    #[arg(long, id = "loss.aggregation", value_enum)]
    pub loss_aggregation: Option<Aggregation>,
    /// Importance ratio level: token (GRPO) or sequence (GSPO).
    #[arg(long, id = "loss.importance", value_enum)]
    pub importance: Option<Importance>,
    /// Policy updates per generated batch.
    #[arg(long, id = "run.num-iterations")]
    pub num_iterations: Option<usize>,
    /// Most new tokens per completion.
    #[arg(long, id = "rollout.max-new-tokens")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature for rollouts.
    #[arg(long, id = "rollout.temperature")]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold for rollouts (1 = off).
    #[arg(long, id = "rollout.top-p")]
    pub top_p: Option<f64>,
    /// Rows per generation call (bounds memory).
    #[arg(long, id = "rollout.generation-batch")]
    pub generation_batch: Option<usize>,
    /// Sampling randomness: `step` (one stream over the step's rows) or `group` (per
    /// completion, from its group's place in the data: what a data-parallel run uses,
    /// so one process reproduces it).
    #[arg(long, id = "rollout.seeds", value_enum)]
    pub rollout_seeds: Option<cal_train::config::SampleSeeds>,
    /// Data parallel: compare the ranks' weight checksums every this many steps (0 =
    /// never).
    #[arg(long, id = "run.weight-check-every")]
    pub weight_check_every: Option<usize>,
    /// Who samples the rollouts: `local` (this process) or `vllm` (the --rollout-url
    /// servers, or without one a server started for the run; the policy is synced
    /// there after every step).
    #[arg(long, id = "rollout.engine", value_enum)]
    pub rollout_engine: Option<cal_train::config::RolloutEngine>,
    /// vLLM servers, comma-separated (`http://127.0.0.1:8000`), replicas of one base
    /// model that share each step's prompts.
    #[arg(long, id = "rollout.urls", value_delimiter = ',')]
    pub rollout_url: Option<Vec<String>>,
    /// A folder the servers can read, for each step's adapter [default:
    /// <output-dir>/engine-sync].
    #[arg(long, id = "rollout.sync-dir")]
    pub rollout_sync_dir: Option<PathBuf>,
    /// The python of the vLLM install a started server runs on [default:
    /// $CAL_VLLM_PYTHON, else the venv of scripts/install-vllm.sh].
    #[arg(long, id = "rollout.server-python", visible_alias = "vllm-python")]
    pub server_python: Option<PathBuf>,
    /// Extra arguments for a started vLLM server, space-separated, after the project's
    /// own (`--server-args="--dtype bfloat16"`).
    #[arg(
        long,
        id = "rollout.server-args",
        visible_alias = "vllm-args",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub server_args: Option<Vec<String>>,
    /// After each sync, the largest mean |logp_server − logp_trainer| on a fixed
    /// completion that is not an error (0 = no check).
    #[arg(long, id = "rollout.sync-check-tol")]
    pub sync_check_tol: Option<f64>,
    /// Cap C of the truncated importance weights min(exp(logp_old − logq), C) on an
    /// engine's samples (0 = off).
    #[arg(long, id = "loss.engine-is-cap")]
    pub engine_is_cap: Option<f64>,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, id = "checkpoint.save-every")]
    pub save_every: Option<usize>,
    /// Reward functions and weights: `correctness=1.0,format=0.2` (correctness, format,
    /// length).
    #[arg(long, id = "reward.functions")]
    pub reward: Option<String>,
    /// Tokens a completion may use before the `length` reward penalises it.
    #[arg(long, id = "reward.length-budget")]
    pub length_budget: Option<usize>,
    /// Evaluate held-out accuracy (greedy) every N steps and at the last (0 = only after
    /// training); logged as eval/* in TensorBoard and metrics.jsonl.
    #[arg(long, id = "eval.every")]
    pub eval_every: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub oracle: OracleFlags,
    #[command(flatten)]
    #[serde(flatten)]
    pub prompt: PromptFlags,
    /// Rows per forward/backward of the loss, gradients accumulated exactly
    /// (0 = no row cap). Bounds memory on real models.
    #[arg(long, id = "run.micro-batch")]
    pub micro_batch: Option<usize>,
    /// Padded tokens per forward/backward of the loss (0 = off): rows sorted by length,
    /// packed up to this budget (and --micro-batch rows, unless 0).
    #[arg(long, id = "run.micro-batch-tokens")]
    pub micro_batch_tokens: Option<usize>,
    /// Compute a group's shared prompt once (generation prefill, policy, reference,
    /// old-policy and value passes; micro-batches hold whole groups).
    #[arg(long, id = "run.shared-prefix", value_enum)]
    pub shared_prefix: Option<Switch>,
}

/// Keys whose default is worked out from other values (their help says how), so no
/// single default is shown for them.
pub const DERIVED: &[&str] = &[
    "run.output-dir",
    "oracle.model",
    "oracle.temperature",
    "model.lora.alpha",
    "loss.epsilon-high",
    "run.steps",
    "credit.mode",
    "credit.advantage",
    "model.tiny.sft-steps",
    "model.tiny.sft-chain-steps",
    "model.tiny.train-problems",
];

/// Sets `path` (dotted) in a nested JSON object.
fn set_path(root: &mut Value, path: &str, v: Value) {
    let mut node = root;
    let mut keys = path.split('.').peekable();
    while let Some(k) = keys.next() {
        if keys.peek().is_none() {
            node[k] = v;
            return;
        }
        if !node[k].is_object() {
            node[k] = json!({});
        }
        node = &mut node[k];
    }
}

/// The value at a dotted `path` of a nested JSON object.
pub fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(root, |n, k| n.get(k))
}

/// A configuration value as a user types it (`3e-5`, not `0.00003`; lists with commas).
pub fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map_or(x.to_string(), String::from))
            .collect::<Vec<_>>()
            .join(","),
        Value::Number(n) if n.as_f64().is_some_and(|x| x != 0.0 && x.abs() < 1e-3) => {
            format!("{:e}", n.as_f64().unwrap_or_default())
        }
        v => v.to_string(),
    }
}

/// The flags of `cmd` that set a configuration key, as (flag field, key). A flag's clap
/// id *is* its key (`#[arg(long, id = "rollout.num-generations")]`), so this table is
/// read off the parser and a flag is declared once, on its field. The field's serde
/// name is its long flag with underscores (clap derives the flag from the field name).
pub fn keyed_flags(cmd: &Command) -> Vec<(String, String)> {
    cmd.get_arguments()
        .filter(|a| a.get_id().as_str().contains('.'))
        .filter_map(|a| {
            let field = a.get_long()?.replace('-', "_");
            Some((field, a.get_id().to_string()))
        })
        .collect()
}

/// A keyed flag's value placeholder from its name (`<NUM_GENERATIONS>`), not its id (the
/// key, which clap would show), for every flag of `cmd` and its subcommands.
pub fn name_keyed_values(mut cmd: Command) -> Command {
    for (field, key) in keyed_flags(&cmd) {
        cmd = cmd.mut_arg(&key, |a| {
            let named = a
                .get_value_names()
                .is_some_and(|n| n.iter().any(|v| v != key.as_str()));
            if named {
                a
            } else {
                a.value_name(field.to_uppercase())
            }
        });
    }
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, name_keyed_values);
    }
    cmd
}

/// Partial run configurations merged, later ones winning.
pub fn merge_layers(layers: impl IntoIterator<Item = Value>) -> Value {
    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }
    let mut out = json!({});
    for l in layers {
        merge(&mut out, l);
    }
    out
}

/// The flags that were given, as a partial run configuration.
pub fn flag_layer<A: Args + Serialize>(flags: &A) -> Result<Value> {
    let given = serde_json::to_value(flags)?;
    let mut out = json!({});
    for (field, key) in keyed_flags(&A::augment_args(Command::new("flags"))) {
        if let Some(v) = given.get(&field).filter(|v| !v.is_null()) {
            set_path(&mut out, &key, v.clone());
        }
    }
    Ok(out)
}

impl TrainArgs {
    /// How the run starts on its output folder (`--resume`, `--overwrite` or fresh).
    pub fn start(&self) -> cal_train::rundir::Start {
        cal_train::rundir::Start::from_flags(self.resume, self.overwrite)
    }

    /// Defaults → model profile → `command_defaults` → `--config` → flags.
    pub fn resolve_with(&self, command_defaults: Value) -> Result<RunConfig> {
        let mut layer = flag_layer(self)?;
        if self.use_cal {
            match self.credit {
                Some(CreditMode::Outcome) => bail!(
                    "--use-cal needs a span-using credit mode (span, span-scaled or prefix), not `outcome`"
                ),
                Some(_) => {}
                None => set_path(&mut layer, "credit.mode", json!("span")),
            }
        }
        RunConfig::resolve_layers(self.config.as_deref(), &command_defaults, &layer)
    }

    pub fn resolve(&self) -> Result<RunConfig> {
        self.resolve_with(json!({}))
    }
}

/// `experiment`'s own defaults: they sit below a `--config` file.
pub fn experiment_defaults() -> Value {
    json!({
        "data": {"num-samples": 960},
        "rollout": {"num-generations": 8},
        "run": {"output-dir": "runs/experiment"},
        "credit": {"mode": "span"},
        "eval": {"every": 20},
    })
}

/// The configuration a command resolves to with no file and no flag, for the `tiny`
/// model and for any other (the two model profiles), as JSON to look keys up in.
pub fn profile_defaults(command_defaults: &Value) -> Result<(Value, Value)> {
    let resolve = |flags: Value| -> Result<Value> {
        Ok(serde_json::to_value(RunConfig::resolve_layers(
            None,
            command_defaults,
            &flags,
        )?)?)
    };
    Ok((
        resolve(json!({}))?,
        resolve(json!({"model": {"name": "other"}}))?,
    ))
}

/// Appends each train flag's default (from the run configuration, with the command's
/// own defaults) to its help, so that `--help` shows defaults written once.
pub fn annotate_defaults(mut cmd: Command, command_defaults: &Value) -> Command {
    let Ok((tiny, other)) = profile_defaults(command_defaults) else {
        return cmd;
    };
    for (_, path) in keyed_flags(&cmd) {
        let path = path.as_str();
        if DERIVED.contains(&path) {
            continue; // derived from other values; their help says how
        }
        let (Some(t), Some(o)) = (lookup(&tiny, path), lookup(&other, path)) else {
            continue;
        };
        // the "other" profile is made by naming another model: its name is no default
        let default = if t == o || path == "model.name" {
            show(t)
        } else {
            format!("{} for tiny, {} otherwise", show(t), show(o))
        };
        cmd = cmd.mut_arg(path, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {default}] [config: {path}]"))
        });
    }
    cmd
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn parse(args: &[&str]) -> Result<RunConfig> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))?;
        cli.train.resolve()
    }

    #[test]
    fn seed_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            (
                c.data.num_samples,
                c.credit.negative_reward,
                c.credit.max_error_span
            ),
            (-1, -1.0, 64)
        );
        assert_eq!(
            (c.credit.mode, c.oracle.provider),
            (CreditMode::Outcome, Provider::Calculator)
        );
        let c = parse(&[
            "--use-cal",
            "--num-samples",
            "-1",
            "--negative-reward",
            "-0.5",
        ])
        .unwrap();
        assert_eq!(
            (c.credit.mode, c.credit.negative_reward),
            (CreditMode::Span, -0.5)
        );
        assert_eq!(c.output_dir(), PathBuf::from("runs/cal-seed42"));
        let c = parse(&[
            "--use-cal",
            "--credit",
            "prefix",
            "--api-provider",
            "gemini",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--top-p",
            "0.9",
            "--generation-batch",
            "16",
            "--lora-targets",
            "q_proj,v_proj",
            "--importance",
            "gspo",
        ])
        .unwrap();
        assert_eq!(
            (c.credit.mode, c.oracle.model.as_deref()),
            (CreditMode::Prefix, Some("gemini-2.0-flash"))
        );
        assert_eq!((c.rollout.top_p, c.rollout.generation_batch), (0.9, 16));
        assert_eq!(c.model.lora.targets, ["q_proj", "v_proj"]);
        assert_eq!(c.loss.importance, Importance::Sequence);
    }

    /// Values to try on a flag until one parses, passes the configuration's checks and
    /// reads back from its key unchanged.
    const SAMPLES: &[&str] = &[
        "3",
        "2",
        "0.5",
        "0.25",
        "true",
        "runs/x",
        "q_proj",
        "correctness=0.5",
        "miss=0.5",
        "http://127.0.0.1:9",
        "cuda:1",
    ];

    /// Every keyed flag of `cmd` (generated from the parser, not listed by hand) reaches
    /// its key and back: a sample value given as the flag is the value at the key in the
    /// resolved configuration, and moves it off the default. `resolve` turns one flag's
    /// arguments into the configuration.
    pub(crate) fn round_trip(cmd: &Command, resolve: &dyn Fn(&[String]) -> Result<RunConfig>) {
        let flags = keyed_flags(cmd);
        assert!(flags.len() > 5, "{}: too few keyed flags", cmd.get_name());
        let default = serde_json::to_value(resolve(&[]).unwrap()).unwrap();
        for (field, key) in flags {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == key.as_str())
                .unwrap();
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_string())
                .collect();
            let candidates = possible
                .iter()
                .map(String::as_str)
                .chain(SAMPLES.iter().copied());
            let flag = format!("--{}", field.replace('_', "-"));
            let hit = candidates.into_iter().find(|v| {
                let Ok(cfg) = resolve(&[flag.clone(), v.to_string()]) else {
                    return false;
                };
                let got = serde_json::to_value(cfg).unwrap();
                let at = |c: &Value| lookup(c, &key).filter(|x| !x.is_null()).map(show);
                at(&got).as_deref() == Some(*v) && at(&got) != at(&default)
            });
            assert!(
                hit.is_some(),
                "{} {flag}: no sample value reaches {key} and back",
                cmd.get_name()
            );
        }
    }

    #[test]
    fn every_train_flag_reaches_its_key_and_back() {
        let cmd = <Cli as clap::CommandFactory>::command();
        round_trip(&cmd, &|args| {
            let cli = Cli::try_parse_from(std::iter::once("t".to_string()).chain(args.to_vec()))?;
            cli.train.resolve()
        });
        // and no flag sets a key twice
        let mut keys: Vec<_> = keyed_flags(&cmd).into_iter().map(|(_, k)| k).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }

    #[test]
    fn old_engine_keys_and_flags_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(
            &path,
            "[rollout]\nvllm-python = \"/opt/py\"\nvllm-args = [\"--dtype\", \"bfloat16\"]\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.rollout.server_python, Some(PathBuf::from("/opt/py")));
        assert_eq!(c.rollout.server_args, ["--dtype", "bfloat16"]);
        let c = parse(&["--vllm-python", "/p", "--vllm-args=--a b"]).unwrap();
        assert_eq!(c.rollout.server_python, Some(PathBuf::from("/p")));
        assert_eq!(c.rollout.server_args, ["--a", "b"]);
        // printed under the new names
        assert!(c.to_toml().unwrap().contains("server-args"));
    }

    #[test]
    fn contradictions_are_errors() {
        assert!(parse(&["--use-cal", "--credit", "outcome"]).is_err());
        assert!(parse(&["--num-generations", "1"]).is_err());
        assert!(parse(&["--num-samples", "0"]).is_err());
        assert!(parse(&["--credit", "nope"]).is_err());
        assert!(parse(&["--device", "tpu"]).is_err());
        assert!(parse(&["--loss-aggregation", "sum"]).is_err());
        let err = format!(
            "{:#}",
            parse(&["--reward", "correctness=1,nope=2"]).unwrap_err()
        );
        assert!(
            err.contains("reward.functions") && err.contains("nope"),
            "{err}"
        );
        let c = parse(&[
            "--reward",
            "correctness=1.0,format=0.2",
            "--eval-every",
            "5",
        ])
        .unwrap();
        assert_eq!(c.reward.functions().unwrap().fns.len(), 2);
        assert_eq!(c.eval.every, 5);
    }

    #[test]
    fn config_file_then_flags_and_print_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[credit]\nmode = \"span\"\nmax-error-span = 16\n[rollout]\nnum-generations = 8\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p]).unwrap();
        assert_eq!(
            (
                c.credit.mode,
                c.rollout.num_generations,
                c.credit.max_error_span
            ),
            (CreditMode::Span, 8, 16)
        );
        let c = parse(&["--config", p, "--num-generations", "2", "--beta", "0"]).unwrap();
        assert_eq!((c.rollout.num_generations, c.loss.beta), (2, 0.0));
        // what --print-config prints, fed back, is the same configuration
        let printed = dir.path().join("printed.toml");
        std::fs::write(&printed, c.to_toml().unwrap()).unwrap();
        assert_eq!(parse(&["--config", printed.to_str().unwrap()]).unwrap(), c);
        std::fs::write(&path, "[rollout]\nnum-generationz = 8\n").unwrap();
        let err = format!("{:#}", parse(&["--config", p]).unwrap_err());
        assert!(
            err.contains("c.toml") && err.contains("num-generationz"),
            "{err}"
        );
    }
}

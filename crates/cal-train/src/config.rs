//! The run configuration: one nested type that is also the TOML schema.
//!
//! Values are layered, later layers winning: built-in defaults → the model profile
//! (`tiny` trains from scratch and wants other rates than a pretrained model) → the
//! `--config` TOML file → command-line flags. [`figment`] does the layering; this module
//! only says what the layers are. `cal-grpo train --print-config` prints the result as
//! TOML, and that file read back through `--config` gives the same configuration.
//!
//! Every key with its default and its flag: `docs/configuration.md`, generated from
//! these types and the flags (`cal-grpo config-docs`) and checked by `cargo test`.

use crate::adamw::OptimConfig;
use crate::loss::LossConfig;
use crate::value::PpoConfig;
use anyhow::{bail, Context, Result};
use cal_core::credit::{CreditConfig, Estimator};
use cal_core::data::Style;
use cal_core::locate::LocateConfig;
use cal_core::reward::RewardFns;
use cal_model::{DTypeSpec, DeviceSpec, LoraConfig, Placement};
use cal_oracle::OracleSpec;
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which algorithm a run trains with (`[run] algorithm`, `--algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AlgorithmKind {
    /// Critic-free: group-relative advantages (grpo, dr-grpo, rloo) or REINFORCE++.
    #[default]
    Grpo,
    /// A value head and GAE over token rewards, a clipped value loss.
    Ppo,
    /// Online DPO: each group's right and wrong rollouts as preference pairs (`[dpo]`).
    Dpo,
    /// On-policy distillation: each sampled token rewarded by log π_T − log π_S under
    /// `distill.teacher`, added to GRPO's advantages (`[distill]`).
    OnPolicyDistill,
}

impl AlgorithmKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Grpo => "grpo",
            Self::Ppo => "ppo",
            Self::Dpo => "dpo",
            Self::OnPolicyDistill => "on-policy-distill",
        }
    }
}

/// Everything a GRPO / CAL-GRPO run needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub rollout: RolloutConfig,
    pub reward: RewardSection,
    pub credit: CreditConfig,
    pub oracle: OracleSpec,
    pub locate: LocateConfig,
    pub loss: LossConfig,
    pub ppo: PpoConfig,
    pub optim: OptimConfig,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    pub sft: SftSection,
    pub dpo: DpoSection,
    pub distill: DistillSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RunSection {
    /// `grpo` (critic-free) or `ppo` (a value head and GAE; see `[ppo]`).
    pub algorithm: AlgorithmKind,
    /// Data order, sampling, initialisation.
    pub seed: u64,
    /// Optimizer steps (`None`: one pass over the training problems).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Checkpoints, logs, results, exported model (`None`: `runs/<kind>-seed<SEED>`, kind `baseline`, `cal`, `ppo` or `cal-ppo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<PathBuf>,
    /// Policy updates per generated batch (> 1 reuses stored old log-probs).
    pub num_iterations: usize,
    /// Rows per loss forward/backward, gradients accumulated exactly (0 = no row cap).
    pub micro_batch: usize,
    /// Padded tokens per loss forward/backward (0 = off): rows are sorted by length and
    /// packed up to this budget, so memory, not a row count, sets the micro-batch, and
    /// rows of similar length share their padding.
    pub micro_batch_tokens: usize,
    /// `on`: the rows of a group compute their shared prompt once (prefill in local
    /// generation; the policy, reference, old-policy and value passes), and micro-batches
    /// hold whole groups. `off`: every row carries its own copy of the prompt.
    pub shared_prefix: Switch,
    /// Data parallel: every this many steps the ranks compare a checksum of their
    /// weights, and a mismatch stops the run (0 = never).
    pub weight_check_every: usize,
}

/// A setting that is `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Switch {
    #[default]
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        self == Switch::On
    }
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            algorithm: AlgorithmKind::Grpo,
            seed: 42,
            steps: None,
            output_dir: None,
            num_iterations: 1,
            micro_batch: 2,
            micro_batch_tokens: 0,
            shared_prefix: Switch::On,
            weight_check_every: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ModelSection {
    /// `tiny` (embedded), a Hugging Face folder or a `.gguf` file.
    pub name: String,
    pub device: DeviceSpec,
    pub dtype: DTypeSpec,
    /// QLoRA: the frozen base held quantized under the LoRA adapters: the decoder
    /// layers' linear weights in this format, the embedding and head in Q8_0 (`none`:
    /// the base in the model's dtype; `keep`: a .gguf file's own blocks, never
    /// dequantized).
    pub quantize_base: QuantizeBase,
    pub lora: LoraSection,
    pub tiny: TinySection,
}

/// How QLoRA holds the frozen base (`model.quantize-base`, `--quantize-base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum QuantizeBase {
    /// Not quantized.
    #[default]
    #[serde(rename = "none")]
    #[value(name = "none")]
    None,
    /// 4-bit blocks of 32 with a scale (GGML Q4_0).
    #[serde(rename = "q4_0")]
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit blocks of 32 with a scale and a minimum (GGML Q4_1).
    #[serde(rename = "q4_1")]
    #[value(name = "q4_1")]
    Q4_1,
    /// 8-bit blocks of 32 with a scale (GGML Q8_0).
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
    /// A `.gguf` model's own blocks, as they load (never dequantized).
    #[serde(rename = "keep")]
    #[value(name = "keep")]
    Keep,
}

impl QuantizeBase {
    /// The GGML format, `None` when the base stays unquantized.
    pub fn ggml(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType;
        match self {
            Self::None => None,
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Keep => None,
        }
    }

    /// Whether the base is held quantized at all.
    pub fn on(self) -> bool {
        self != Self::None
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            name: "tiny".into(),
            device: DeviceSpec::Cpu,
            dtype: DTypeSpec::F32,
            quantize_base: QuantizeBase::None,
            lora: LoraSection::default(),
            tiny: TinySection::default(),
        }
    }
}

/// The recipe of the embedded `tiny` model (`name = "tiny"`): its size and its SFT warm
/// start. Unset fields keep the recipe's defaults ([`crate::tiny::TinySpec`]); each
/// distinct recipe is trained once and cached under its own key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TinySection {
    /// SFT steps of the warm start (`None`: the recipe's, by wording).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sft_steps: Option<usize>,
    /// Peak SFT learning rate (`None`: the recipe's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sft_learning_rate: Option<f64>,
    /// Generated training problems, shared by SFT and RL (`None`: the recipe's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_problems: Option<usize>,
    /// Width and depth (`None`: the recipe's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    /// Chance that a carrying or borrowing step of an SFT demonstration shows its
    /// classic misconception (`None`: the recipe's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misconception_rate: Option<f64>,
    /// Largest intermediate value of the generated problems (`None`: the recipe's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_value: Option<u64>,
    /// Chain lengths of the SFT corpus, `"MIN-MAX"` or `"K"` (`None`: the run's own,
    /// `data.steps`). One warm start then serves runs at several K: the same model,
    /// so the same skill per arithmetic step, with only the RL problems' K changing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sft_chain_steps: Option<String>,
}

impl TinySection {
    /// `sft-chain-steps` as `(min, max)`; an error names the key and the value.
    pub fn sft_chain_range(&self) -> Result<Option<(usize, usize)>> {
        let Some(text) = &self.sft_chain_steps else {
            return Ok(None);
        };
        let parse = |t: &str| t.trim().parse::<usize>().ok().filter(|&k| k >= 1);
        let range = match text.split_once('-') {
            Some((a, b)) => parse(a).zip(parse(b)),
            None => parse(text).map(|k| (k, k)),
        };
        match range {
            Some((a, b)) if a <= b => Ok(Some((a, b))),
            _ => bail!(
                "model.tiny.sft-chain-steps must be K or MIN-MAX with 1 <= MIN <= MAX, got {text:?}"
            ),
        }
    }
}

impl ModelSection {
    pub fn placement(&self) -> Placement {
        Placement {
            device: self.device,
            dtype: self.dtype,
        }
    }
}

/// LoRA instead of full fine-tuning when `rank > 0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: usize,
    /// `None`: 2 × rank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA input in training forwards, in [0, 1).
    pub dropout: f64,
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: None,
            dropout: 0.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraSection {
    /// The scale numerator in force: `alpha`, or 2 × rank when unset.
    pub fn alpha_or_default(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    /// The adapters to add, or `None` for full fine-tuning.
    pub fn adapters(&self) -> Option<LoraConfig> {
        (self.rank > 0).then(|| LoraConfig {
            rank: self.rank,
            alpha: self.alpha_or_default(),
            dropout: self.dropout,
            targets: self.targets.clone(),
        })
    }
}

/// The instruction after the question for chat models: it asks for the format the
/// grader (`####`) and the calculator oracle (`a op b = c`) read best.
pub const DEFAULT_INSTRUCTION: &str =
    "Solve the problem step by step. Write every calculation as an equation like 3 * 4 = 12. \
     End with a final line of the form '#### <number>'.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DataSection {
    /// `generated` (embedded problems) or a GSM8K `.jsonl` / `.parquet` file.
    pub dataset: String,
    /// Held-out data (`None`: the generated held-out split, or `test.jsonl` beside
    /// the dataset file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_dataset: Option<String>,
    /// Training problems (-1 = all).
    pub num_samples: i64,
    /// Held-out problems evaluated (-1 = all).
    pub eval_samples: i64,
    /// Wording of the generated problems (`dataset = "generated"`; the `tiny` model is
    /// trained on the same): `story` or `chain`.
    pub style: Style,
    /// Arithmetic steps per generated problem (`None`: 2 or 3 per problem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// minijinja template of the user turn, with `{{ question }}` and `{{ instruction }}`
    /// (`None`: the question, a newline and the instruction for chat models; the
    /// question alone inside `Question: …\nAnswer:` for plain ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_template: Option<String>,
    /// System prompt of chat models (`None`: the chat template's own default); for plain
    /// models, a paragraph before the prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// The instruction after the question (chat models, or `{{ instruction }}`).
    pub instruction: String,
    /// Worked examples from the training split shown before the question.
    pub few_shot: usize,
    /// Seed that draws the few-shot examples.
    pub few_shot_seed: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            dataset: "generated".into(),
            eval_dataset: None,
            num_samples: -1,
            eval_samples: -1,
            // the embedded benchmark that learns (`docs/results.md`): chains of 3
            style: Style::Chain,
            steps: Some(3),
            prompt_template: None,
            system_prompt: None,
            instruction: DEFAULT_INSTRUCTION.to_string(),
            few_shot: 0,
            few_shot_seed: 0,
        }
    }
}

/// How completions are sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Completions per prompt: the GRPO group size G (≥ 2).
    pub num_generations: usize,
    /// Prompts per step (each gets `num_generations` completions).
    pub prompts_per_step: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// Rows per generation call (bounds memory).
    pub generation_batch: usize,
    /// Where sampling randomness comes from: `step` (one stream over the step's rows)
    /// or `group` (each completion its own stream, from the seed and its group's place
    /// in the data, so a data-parallel run samples what one process does; forced on
    /// under `mpirun`).
    pub seeds: SampleSeeds,
    /// Who samples the rollouts: `local` (this process) or `vllm` (the servers in
    /// `urls`, or one started for the run; the policy synced after every step).
    pub engine: RolloutEngine,
    /// vLLM servers (`http://host:port`), data-parallel replicas of one base model
    /// (empty: the CLI starts one on this machine and stops it at the end).
    pub urls: Vec<String>,
    /// The python of the engine's install that a started server runs on (`None`:
    /// `$CAL_VLLM_PYTHON`, else the venv of `scripts/install-vllm.sh`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_python: Option<PathBuf>,
    /// Extra arguments for a started server, after the project's own (they win).
    pub server_args: Vec<String>,
    /// The old names of `server-python` and `server-args`, still read (moved to the new
    /// keys when the configuration is finished, never written).
    #[serde(rename = "vllm-python", skip_serializing)]
    pub old_server_python: Option<PathBuf>,
    #[serde(rename = "vllm-args", skip_serializing)]
    pub old_server_args: Option<Vec<String>>,
    /// After each sync, the largest mean |logp_server − logp_trainer| on a fixed
    /// completion that is not an error (0 = no check).
    pub sync_check_tol: f64,
    /// A folder the servers can read, where each step's adapter is written (`None`:
    /// `<output-dir>/engine-sync`, for servers on this machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_dir: Option<PathBuf>,
}

/// Where a step's sampling randomness comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SampleSeeds {
    /// The run's random stream, drawn over the step's rows in order.
    #[default]
    Step,
    /// One stream per completion, seeded by its group's index in the data.
    Group,
}

/// Where rollouts are generated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutEngine {
    /// In this process, with the trainer's own weights.
    #[default]
    Local,
    /// On vLLM servers (`rollout.urls`), through their OpenAI-compatible API.
    Vllm,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            num_generations: 4,
            prompts_per_step: 8,
            max_new_tokens: 256,
            temperature: 1.0,
            top_p: 1.0,
            generation_batch: 64,
            seeds: SampleSeeds::Step,
            engine: RolloutEngine::Local,
            urls: Vec::new(),
            server_python: None,
            server_args: Vec::new(),
            old_server_python: None,
            old_server_args: None,
            sync_check_tol: 0.05,
            sync_dir: None,
        }
    }
}

/// What a rollout scores: named reward functions, weighted ([`cal_core::reward`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RewardSection {
    /// `name=weight,...` of `correctness`, `format`, `length`.
    pub functions: String,
    /// Tokens a completion may use before `length` penalises it.
    pub length_budget: usize,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            functions: "correctness=1.0".into(),
            length_budget: 64,
        }
    }
}

impl RewardSection {
    pub fn functions(&self) -> Result<RewardFns> {
        RewardFns::parse(&self.functions, self.length_budget)
            .map_err(|e| anyhow::anyhow!("reward.functions: {e}"))
    }
}

/// Held-out evaluation during training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate held-out accuracy (greedy) every N steps and at the last (0 = only after
    /// training). The held-out set is `data.eval-samples` problems.
    pub every: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
}

/// Supervised fine-tuning on reference solutions (`cal-grpo sft`, the warm start of a
/// real model). The model, data, LoRA, seed, output folder and AdamW settings come from
/// the other sections; the peak learning rate is this section's, with a linear warmup
/// over the first tenth of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SftSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Padded tokens per forward/backward (0 = whole batches): a batch that does not fit
    /// is split into length-sorted micro-batches, gradients accumulated exactly. 2048
    /// keeps SmolLM2-135M on GSM8K near 8 GB.
    pub micro_batch_tokens: usize,
}

impl Default for SftSection {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 8,
            learning_rate: 2e-5,
            micro_batch_tokens: 2048,
        }
    }
}

/// Preference optimisation (`cal-grpo dpo`): DPO, IPO or ORPO on pairs of answers to one
/// prompt, TRL's conventions. The model, LoRA, seed, output folder and AdamW settings
/// come from the other sections; the learning rate is this section's, with a linear
/// warmup over the first tenth of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DpoSection {
    /// β: how far the policy may move from the reference (ORPO: the odds-ratio weight λ).
    pub beta: f64,
    /// `sigmoid` (DPO), `ipo` or `orpo`.
    pub loss: crate::preference::PrefLoss,
    /// Which tokens a pair's log-probs sum: `full` (every answer token) or
    /// `first-error` (only the first differing step).
    pub pair_credit: crate::preference::PairCredit,
    /// Optimizer steps.
    pub steps: usize,
    /// Pairs per step (4: a SmolLM2 LoRA step of 8 pairs took 38.8 s on 2 cores, and the
    /// step time goes with the pairs).
    pub batch_size: usize,
    /// Peak learning rate (5e-5 suits LoRA; full fine-tuning of a large model wants
    /// TRL's 1e-6).
    pub learning_rate: f64,
    /// Most tokens of prompt and answer together; longer answers are cut at the end.
    pub max_length: usize,
    /// Most prompt tokens; longer prompts keep their end.
    pub max_prompt_length: usize,
    /// Pairs held out of the training file for the held-out pair accuracy when no
    /// `data.eval-dataset` is given.
    pub eval_pairs: usize,
    /// Padded tokens per forward/backward (0 = whole batches); a pair is never split.
    pub micro_batch_tokens: usize,
}

impl Default for DpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: crate::preference::PrefLoss::Sigmoid,
            pair_credit: crate::preference::PairCredit::Full,
            steps: 100,
            batch_size: 4,
            learning_rate: 5e-5,
            max_length: 1024,
            max_prompt_length: 512,
            eval_pairs: 64,
            micro_batch_tokens: 2048,
        }
    }
}

/// `cal-grpo distill`: a student trained toward a teacher on the data's solutions
/// (Tunix's strategies). The student is `model.name`, or the teacher with
/// `student-layers` kept; LoRA, seed, output folder and AdamW settings come from the
/// other sections; the learning rate is this section's, with a linear warmup over the
/// first tenth of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct DistillSection {
    /// The teacher: a Hugging Face folder, a `.gguf` file, `random:CONFIG.json`.
    pub teacher: String,
    /// The student as the teacher's layers with these indices (`0,3,6`; empty: the
    /// student is `model.name`).
    pub student_layers: String,
    /// `logit`, `attention` or `feature`.
    pub strategy: crate::distill::losses::Strategy,
    /// Softmax temperature τ of the logit strategy (the KL is scaled by τ²).
    pub temperature: f64,
    /// Weight of the distillation term; the solution tokens' cross-entropy gets 1 − α.
    pub alpha: f64,
    /// Student layer → teacher layer pairs of the attention and feature strategies
    /// (`0:0,1:3`; empty: the kept layers, else spread evenly).
    pub layer_map: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Padded tokens per forward/backward (0 = whole batches).
    pub micro_batch_tokens: usize,
    /// On-policy distillation (`train --algorithm on-policy-distill`): the weight of
    /// the per-token reward log π_T − log π_S beside GRPO's outcome advantages.
    pub weight: f64,
}

impl Default for DistillSection {
    fn default() -> Self {
        Self {
            teacher: String::new(),
            student_layers: String::new(),
            strategy: crate::distill::losses::Strategy::Logit,
            temperature: 2.0,
            alpha: 0.5,
            layer_map: String::new(),
            steps: 100,
            batch_size: 8,
            learning_rate: 1e-4,
            micro_batch_tokens: 2048,
            weight: 1.0,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self { save_every: 10 }
    }
}

/// A kind of run: its name (the run's folder, `runs/<name>-seed<S>`, an experiment's
/// arm folder and the progress bar's label), the name `experiment --arms` selects it
/// by, and what it trains. The one place these names live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunKind {
    pub name: &'static str,
    pub arm: &'static str,
    pub algorithm: AlgorithmKind,
    /// With oracle spans (a CAL credit mode), else outcome credit.
    pub cal: bool,
}

impl RunKind {
    pub const ALL: [RunKind; 8] = [
        RunKind {
            name: "baseline",
            arm: "grpo",
            algorithm: AlgorithmKind::Grpo,
            cal: false,
        },
        RunKind {
            name: "cal",
            arm: "cal-grpo",
            algorithm: AlgorithmKind::Grpo,
            cal: true,
        },
        RunKind {
            name: "ppo",
            arm: "ppo",
            algorithm: AlgorithmKind::Ppo,
            cal: false,
        },
        RunKind {
            name: "cal-ppo",
            arm: "cal-ppo",
            algorithm: AlgorithmKind::Ppo,
            cal: true,
        },
        RunKind {
            name: "dpo",
            arm: "dpo",
            algorithm: AlgorithmKind::Dpo,
            cal: false,
        },
        RunKind {
            name: "cal-dpo",
            arm: "cal-dpo",
            algorithm: AlgorithmKind::Dpo,
            cal: true,
        },
        RunKind {
            name: "distill",
            arm: "distill",
            algorithm: AlgorithmKind::OnPolicyDistill,
            cal: false,
        },
        RunKind {
            name: "cal-distill",
            arm: "cal-distill",
            algorithm: AlgorithmKind::OnPolicyDistill,
            cal: true,
        },
    ];

    /// The kind of a run with `algorithm`, with or without oracle spans.
    pub fn of(algorithm: AlgorithmKind, cal: bool) -> RunKind {
        Self::ALL
            .into_iter()
            .find(|k| k.algorithm == algorithm && k.cal == cal)
            .expect("every algorithm has a kind with and without spans")
    }

    /// By its `--arms` name or its folder name.
    pub fn named(name: &str) -> Option<RunKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.arm == name || k.name == name)
    }
}

/// The built-in defaults, finished: what a run with no file and no flags uses (the
/// pretrained profile: `resolve` adds the `tiny` profile for `model.name = "tiny"`).
impl Default for RunConfig {
    fn default() -> Self {
        let mut cfg = Self::unfinished();
        cfg.finish()
            .expect("the built-in defaults pass their own checks");
        cfg
    }
}

impl RunConfig {
    /// The built-in defaults before [`RunConfig::finish`]: the bottom layer, whose
    /// derived values stay unset so that a later layer's `epsilon` or LoRA rank
    /// still decides them.
    fn unfinished() -> Self {
        Self {
            run: RunSection::default(),
            model: ModelSection::default(),
            data: DataSection::default(),
            rollout: RolloutConfig::default(),
            reward: RewardSection::default(),
            credit: CreditConfig::default(),
            oracle: OracleSpec {
                cache: Some(crate::cache::cache_root().join("oracle-cache.sqlite")),
                ..OracleSpec::default()
            },
            locate: LocateConfig::default(),
            loss: LossConfig::default(),
            ppo: PpoConfig::default(),
            optim: OptimConfig::default(),
            eval: EvalSection::default(),
            checkpoint: CheckpointSection::default(),
            sft: SftSection::default(),
            dpo: DpoSection::default(),
            distill: DistillSection::default(),
        }
    }
}

/// The model profile: what differs between the embedded `tiny` model (trained from
/// scratch, short answers, small enough for one batch) and a pretrained model.
/// The defaults above are the pretrained profile.
pub fn profile(model: &str) -> serde_json::Value {
    if model == "tiny" {
        serde_json::json!({
            "optim": {"learning-rate": 1e-4},
            "rollout": {"max-new-tokens": 96},
            "run": {"micro-batch": 0},
        })
    } else {
        serde_json::json!({})
    }
}

impl RunConfig {
    /// Layers defaults → model profile → `file` → `flags` (a partial configuration in
    /// the same nested shape), then checks the result and fills derived values.
    pub fn resolve(file: Option<&Path>, flags: &serde_json::Value) -> Result<Self> {
        Self::resolve_layers(file, &serde_json::json!({}), flags)
    }

    /// [`RunConfig::resolve`] with a command's own defaults (e.g. `experiment`'s sample
    /// count) between the model profile and the file.
    pub fn resolve_layers(
        file: Option<&Path>,
        command_defaults: &serde_json::Value,
        flags: &serde_json::Value,
    ) -> Result<Self> {
        if let Some(p) = file {
            if !p.is_file() {
                bail!("config {}: no such file", p.display());
            }
        }
        let source = file.map(|p| (Toml::file_exact(p), format!("config {}", p.display())));
        Self::resolve_source(source, command_defaults, flags)
    }

    /// A configuration from TOML text alone (defaults underneath); `label` names it
    /// in errors. What `fuzz/fuzz_targets/config_toml.rs` exercises.
    pub fn from_toml_str(text: &str, label: &str) -> Result<Self> {
        let source = Some((Toml::string(text), format!("config {label}")));
        Self::resolve_source(source, &serde_json::json!({}), &serde_json::json!({}))
    }

    fn resolve_source(
        source: Option<(figment::providers::Data<Toml>, String)>,
        command_defaults: &serde_json::Value,
        flags: &serde_json::Value,
    ) -> Result<Self> {
        let layers = |profile: &serde_json::Value| {
            let mut fig = Figment::from(Serialized::defaults(RunConfig::unfinished()))
                .merge(Serialized::defaults(profile))
                .merge(Serialized::defaults(command_defaults));
            if let Some((toml, _)) = &source {
                fig = fig.merge(toml);
            }
            fig.merge(Serialized::defaults(flags))
        };
        let context = || match &source {
            Some((_, label)) => label.clone(),
            None => "configuration".into(),
        };
        // The model decides the profile, and the model may come from any layer.
        let model: String = layers(&serde_json::json!({}))
            .extract_inner("model.name")
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(context)?;
        let mut cfg: RunConfig = layers(&profile(&model))
            .extract()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(context)?;
        cfg.finish().with_context(context)?;
        Ok(cfg)
    }

    /// Consistency checks, and the values that derive from others written out, so
    /// that the printed configuration says exactly what runs. Idempotent: the trainer
    /// calls it again on a configuration built in code, so both paths run the same
    /// checks and derive the same values.
    pub fn finish(&mut self) -> Result<()> {
        let r = &self.rollout;
        if r.num_generations < 2 {
            bail!(
                "rollout.num-generations must be at least 2 (GRPO compares completions within a group), got {}",
                r.num_generations
            );
        }
        if r.prompts_per_step == 0 {
            bail!("rollout.prompts-per-step must be at least 1");
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            bail!("rollout.top-p must be in (0, 1], got {}", r.top_p);
        }
        let d = &self.data;
        for (name, n) in [
            ("data.num-samples", d.num_samples),
            ("data.eval-samples", d.eval_samples),
        ] {
            if n < -1 || n == 0 {
                bail!("{name} must be -1 (all) or a positive count, got {n}");
            }
        }
        if !self.credit.negative_reward.is_finite() || !self.credit.prefix_reward.is_finite() {
            bail!("credit.negative-reward and credit.prefix-reward must be finite");
        }
        if !(0.0..1.0).contains(&self.model.lora.dropout) {
            bail!(
                "model.lora.dropout must be in [0, 1), got {}",
                self.model.lora.dropout
            );
        }
        self.reward.functions()?;
        if self.rollout.sync_check_tol.is_nan() || self.rollout.sync_check_tol < 0.0 {
            bail!(
                "rollout.sync-check-tol must be 0 (off) or positive, got {}",
                self.rollout.sync_check_tol
            );
        }
        if self.loss.engine_is_cap < 0.0 {
            bail!(
                "loss.engine-is-cap must be 0 (off) or positive, got {}",
                self.loss.engine_is_cap
            );
        }
        let c = &mut self.credit;
        if !(0.0..=1.0).contains(&c.gamma) || !(0.0..=1.0).contains(&c.lambda) {
            bail!(
                "credit.gamma and credit.lambda must be in [0, 1], got {} and {}",
                c.gamma,
                c.lambda
            );
        }
        match (self.run.algorithm, c.group) {
            // PPO's estimator is GAE; the default (grpo) means "not chosen"
            (AlgorithmKind::Ppo, Estimator::Grpo) => c.group = Estimator::Gae,
            (AlgorithmKind::Ppo, Estimator::Gae)
            | (AlgorithmKind::Grpo | AlgorithmKind::Dpo | AlgorithmKind::OnPolicyDistill, _) => {}
            (AlgorithmKind::Ppo, e) => bail!(
                "run.algorithm = \"ppo\" estimates advantages with its critic (credit.advantage = \"gae\"), not {}",
                e.name()
            ),
        }
        if self.run.algorithm != AlgorithmKind::Ppo && c.group == Estimator::Gae {
            bail!("credit.advantage = \"gae\" needs a critic: run.algorithm = \"ppo\" (--algorithm ppo)");
        }
        let p = &self.ppo;
        if !(p.vf_coef >= 0.0 && p.value_clip >= 0.0 && p.value_lr_scale >= 0.0) {
            bail!(
                "ppo.vf-coef, ppo.value-clip and ppo.value-lr-scale must be 0 or positive, got {}, {} and {}",
                p.vf_coef,
                p.value_clip,
                p.value_lr_scale
            );
        }
        if self.data.steps == Some(0) {
            bail!("data.steps must be at least 1");
        }
        self.model.tiny.sft_chain_range()?;
        self.run.num_iterations = self.run.num_iterations.max(1);
        if self.oracle.model.is_none() {
            self.oracle.model = Some(self.oracle.provider.default_model().into());
        }
        self.loss.epsilon_high = Some(self.loss.clip_high());
        let r = &mut self.rollout;
        if let Some(p) = r.old_server_python.take() {
            r.server_python.get_or_insert(p);
        }
        if let Some(a) = r.old_server_args.take() {
            if r.server_args.is_empty() {
                r.server_args = a;
            }
        }
        if self.model.lora.rank > 0 {
            self.model.lora.alpha = Some(self.model.lora.alpha_or_default());
        }
        self.run.output_dir = Some(self.output_dir());
        Ok(())
    }

    /// Whether the run needs the reference's log-probs: for the KL term (β > 0), or for
    /// online DPO's loss (sigmoid and IPO).
    pub fn needs_reference(&self) -> bool {
        self.loss.beta > 0.0
            || (self.run.algorithm == AlgorithmKind::Dpo && self.dpo.loss.uses_reference())
    }

    /// The run's name: `baseline` / `cal` for GRPO (outcome credit or oracle spans),
    /// `ppo` / `cal-ppo` for PPO.
    pub fn kind(&self) -> &'static str {
        RunKind::of(self.run.algorithm, self.credit.mode.uses_spans()).name
    }

    /// Where the run writes: as configured, or `runs/<kind>-seed<SEED>`, kind `baseline`, `cal`, `ppo` or `cal-ppo`.
    pub fn output_dir(&self) -> PathBuf {
        self.run
            .output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("runs/{}-seed{}", self.kind(), self.run.seed)))
    }

    /// Optimizer steps for `n_train` problems: as configured, or one pass.
    pub fn steps(&self, n_train: usize) -> usize {
        self.run
            .steps
            .unwrap_or_else(|| n_train.div_ceil(self.rollout.prompts_per_step).max(1))
    }

    /// The configuration as TOML (what `--print-config` prints and a run saves).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_profile_file_flags() {
        let c = RunConfig::resolve(None, &serde_json::json!({})).unwrap();
        assert_eq!(c.optim.lr, 1e-4, "tiny profile");
        assert_eq!(c.rollout.max_new_tokens, 96);
        let c =
            RunConfig::resolve(None, &serde_json::json!({"model": {"name": "m.gguf"}})).unwrap();
        assert_eq!(
            (c.optim.lr, c.run.micro_batch),
            (1e-6, 2),
            "pretrained profile"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[optim]\nlearning-rate = 1e-4\n[rollout]\nnum-generations = 8\n",
        )
        .unwrap();
        let flags = serde_json::json!({"rollout": {"num-generations": 6}});
        let c = RunConfig::resolve(Some(&p), &flags).unwrap();
        assert_eq!((c.optim.lr, c.rollout.num_generations), (1e-4, 6));
    }

    #[test]
    fn printed_config_round_trips() {
        let flags = serde_json::json!({
            "model": {"lora": {"rank": 4}},
            "credit": {"mode": "prefix", "prefix-reward": 0.25},
            "oracle": {"provider": "gemini"},
            "loss": {"epsilon": 0.1, "importance": "sequence"},
            "run": {"steps": 7},
        });
        let c = RunConfig::resolve(None, &flags).unwrap();
        assert_eq!(c.oracle.model.as_deref(), Some("gemini-2.0-flash"));
        assert_eq!(c.model.lora.alpha, Some(8.0));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("printed.toml");
        std::fs::write(&p, c.to_toml().unwrap()).unwrap();
        let back = RunConfig::resolve(Some(&p), &serde_json::json!({})).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        for (text, key) in [
            ("[rollout]\nnum-generationz = 8\n", "num-generationz"),
            (
                "[rollout]\nnum-generations = \"eight\"\n",
                "num-generations",
            ),
            ("[rollout]\nnum-generations = 1\n", "num-generations"),
            ("[rollout]\nsync-check-tol = -1.0\n", "sync-check-tol"),
            (
                "[run]\nalgorithm = \"ppo\"\n[credit]\nadvantage = \"rloo\"\n",
                "not rloo",
            ),
            ("[credit]\nadvantage = \"gae\"\n", "needs a critic"),
            ("[credit]\nlambda = 1.5\n", "credit.lambda"),
            ("[ppo]\nvalue-lr-scale = -1.0\n", "ppo.value-lr-scale"),
            ("num-generations = 8\n", "num-generations"),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = RunConfig::resolve(Some(&p), &serde_json::json!({})).unwrap_err();
            let err = format!("{err:#}");
            assert!(
                err.contains("bad.toml") && err.contains(key),
                "{text}: {err}"
            );
        }
        let missing = dir.path().join("nope.toml");
        assert!(RunConfig::resolve(Some(&missing), &serde_json::json!({})).is_err());
    }
}

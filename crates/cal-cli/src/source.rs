//! Where a command's model and data come from: `--model` (`tiny`, a Hugging Face
//! folder, a `.gguf` file or `random:CONFIG.json`) resolved to a policy, and the run's
//! training and held-out problems.

use anyhow::{bail, Context, Result};
use cal_core::data::{self, Example};
use cal_model::{load, Placement};
use cal_train::config::{QuantizeBase, RunConfig};
use cal_train::policy::Policy;
use cal_train::policy::PolicySource;
use cal_train::tiny::{self, TinySpec};
use std::path::PathBuf;

/// The starting policy: the embedded tiny model or a model path, and where it runs.
pub struct Source {
    pub kind: SourceKind,
    pub placement: Placement,
    /// QLoRA's base format: a `random:` model is drawn straight into it, a layer at a
    /// time (a 7B shape's f32 weights would not fit); other models quantize on
    /// `Policy::prepare`.
    pub quantize: QuantizeBase,
}

pub enum SourceKind {
    Tiny(Box<TinySpec>),
    Path(PathBuf),
    /// `random:CONFIG.json`: a randomly initialised model of a real shape (benchmarks
    /// where the weights are not available), with a small BPE trained on generated
    /// problems as its tokenizer.
    Random(PathBuf),
}

impl PolicySource for Source {
    fn fresh(&self) -> Result<Policy> {
        let (dev, dtype) = self.placement.resolve()?;
        match &self.kind {
            SourceKind::Tiny(spec) => {
                Ok(tiny::tiny_policy(spec, &cal_train::cache::cache_root(), &dev, dtype)?.policy)
            }
            SourceKind::Path(p) if self.quantize == QuantizeBase::Keep => {
                if p.extension().and_then(|e| e.to_str()) != Some("gguf") {
                    bail!(
                        "--quantize-base keep holds a .gguf file's own blocks; {} is not one (q4_0, q4_1 or q8_0 quantize it on load)",
                        p.display()
                    );
                }
                let l = load::load_gguf_keep(p, dtype, &dev)?;
                Ok(Policy::new(l.model, l.tokenizer))
            }
            SourceKind::Path(p) => {
                let l = load::load(p, dtype, &dev)?;
                Ok(Policy::new(l.model, l.tokenizer))
            }
            SourceKind::Random(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                let cfg = cal_model::ModelConfig::from_hf_json(&text, p)?;
                let corpus = data::generate(200, 1, &data::GenConfig::default())
                    .into_iter()
                    .map(|e| format!("Question: {}\nAnswer: {}", e.question, e.answer));
                let tok = cal_model::tokenizer::train_tiny(corpus, 400.min(cfg.vocab_size))?;
                if self.quantize == QuantizeBase::Keep {
                    bail!("--quantize-base keep holds a .gguf file's own blocks; a random model has none (q4_0, q4_1 or q8_0 draw it quantized)");
                }
                let model = match self.quantize.ggml() {
                    Some(q) => {
                        cal_model::Transformer::init_random_quantized(cfg, 0, q, dtype, &dev)?
                    }
                    None => cal_model::Transformer::init_random(cfg, 0, dtype, &dev)?,
                };
                Ok(Policy::new(model, tok))
            }
        }
    }

    fn describe(&self) -> String {
        match &self.kind {
            SourceKind::Tiny(spec) => format!(
                "tiny (SFT-warmed, cached in {})",
                cal_train::cache::cache_root()
                    .join(format!("tiny-{}", spec.key()))
                    .display()
            ),
            SourceKind::Path(p) => p.display().to_string(),
            SourceKind::Random(p) => format!("random weights, shape of {}", p.display()),
        }
    }
}

impl Source {
    /// `model` as every command without a run configuration loads it: `tiny` is the
    /// default run's (the chain benchmark `train` and `experiment` use).
    pub fn new(model: &str, placement: Placement) -> Self {
        let default = RunConfig::default();
        let spec = TinySpec::for_run(&default.model.tiny, &default.data);
        Self::with_spec(model, placement, spec)
    }

    fn with_spec(model: &str, placement: Placement, spec: TinySpec) -> Self {
        let kind = if model == "tiny" {
            SourceKind::Tiny(Box::new(spec))
        } else if let Some(cfg) = model.strip_prefix("random:") {
            SourceKind::Random(PathBuf::from(cfg))
        } else {
            SourceKind::Path(PathBuf::from(model))
        };
        Self {
            kind,
            placement,
            quantize: QuantizeBase::None,
        }
    }

    /// The run's model; `tiny` is trained on the run's generated benchmark.
    pub fn of(cfg: &RunConfig) -> Self {
        Self::with_spec(
            &cfg.model.name,
            cfg.model.placement(),
            TinySpec::for_run(&cfg.model.tiny, &cfg.data),
        )
        .quantized(cfg.model.quantize_base)
    }

    /// With QLoRA's base format `q` (see [`Source::quantize`]).
    pub fn quantized(mut self, q: QuantizeBase) -> Self {
        self.quantize = q;
        self
    }

    /// Makes sure the tiny policy exists (trains it on first use) and reports how good
    /// the warm start is.
    pub fn prepare(&self) -> Result<()> {
        if let SourceKind::Tiny(spec) = &self.kind {
            let (dev, dtype) = self.placement.resolve()?;
            let tp = tiny::tiny_policy(spec, &cal_train::cache::cache_root(), &dev, dtype)?;
            if let Some(r) = &tp.sft {
                eprintln!(
                    "tiny SFT: {} steps in {:.0}s, loss {:.3} → {:.3}",
                    r.steps, r.seconds, r.first_loss, r.last_loss
                );
            }
        }
        Ok(())
    }
}

/// Train and held-out problems for a run. A GSM8K file trains whole and is held out
/// against `--eval-dataset` or the `test.jsonl` beside it; the sets that ship as one file
/// (ASDiv, SVAMP, MAWPS, GSM-Hard) train on their seeded 70% and hold out the other 30%,
/// unless `--eval-dataset` names another file.
pub fn datasets(cfg: &RunConfig) -> Result<(Vec<Example>, Vec<Example>)> {
    use data::sets::{load_part, Split};
    let d = &cfg.data;
    let (train, test) = if d.dataset == "generated" {
        TinySpec::run_splits(&cfg.model.tiny, d)
    } else {
        let train = load_part(&d.dataset, Split::Train)?;
        if train.skipped > 0 {
            eprintln!(
                "{}: {} rows skipped (answer not a number)",
                d.dataset, train.skipped
            );
        }
        let test = match &d.eval_dataset {
            Some(e) => load_part(e, Split::All)?.examples,
            None if !train.kind.has_own_split() => load_part(&d.dataset, Split::HeldOut)?.examples,
            None => {
                let p = data::sets::SetSpec::parse(&d.dataset).path;
                let sibling = p.with_file_name("test.jsonl");
                if sibling.exists() && sibling != p {
                    data::load(&sibling)?
                } else {
                    bail!(
                        "no held-out data: pass --eval-dataset FILE (no test.jsonl beside {})",
                        d.dataset
                    )
                }
            }
        };
        (train.examples, test)
    };
    let train = data::select(train, d.num_samples, None);
    let test = data::select(test, d.eval_samples, None);
    Ok((train, test))
}

//! `cal-grpo train`: one GRPO or CAL-GRPO run, its held-out evaluation and the
//! exported model.

use crate::config::TrainArgs;
use crate::source::{datasets, Source};
use anyhow::Result;
use cal_model::load;
use cal_train::collective::Collective;
use cal_train::config::RunConfig;
use cal_train::engine::server::serve_if_needed;
use cal_train::evaluate::{evaluate, EvalConfig, EvalReport};
use cal_train::policy::PolicySource;
use cal_train::trainer::{RunEnd, Trainer};
use std::sync::Arc;

/// `--print-config`: the effective configuration as TOML.
pub fn print_config(cfg: &RunConfig) -> Result<()> {
    print!("{}", cfg.to_toml()?);
    Ok(())
}

/// `ranks`: the processes of a data-parallel run (one by default); rank 0 speaks,
/// writes and evaluates for the run, every rank trains.
pub fn run(args: &TrainArgs, ranks: Arc<dyn Collective>) -> Result<()> {
    let mut cfg = args.resolve()?;
    if args.print_config {
        return print_config(&cfg);
    }
    let source = Source::of(&cfg);
    let main = ranks.is_main();
    // rank 0 fetches data and makes the tiny warm start; the others then read them
    if main {
        source.prepare()?;
    }
    ranks.barrier()?;
    if !main {
        source.prepare()?;
    }
    let (train, test) = datasets(&cfg)?;
    let out = cfg.output_dir();
    if main {
        eprintln!(
            "{} run: {} steps × {} prompts × {} generations on {} problems ({} / {}); output {}",
            cfg.kind(),
            cfg.steps(train.len()),
            cfg.rollout.prompts_per_step,
            cfg.rollout.num_generations,
            train.len(),
            cfg.model.device,
            cfg.model.dtype.name(),
            out.display()
        );
        if ranks.world() > 1 {
            eprintln!(
                "data parallel: {} ranks, {} prompts each per step",
                ranks.world(),
                cfg.rollout.prompts_per_step / ranks.world()
            );
        }
    }
    let name = cfg.kind();
    let config = serde_json::to_value(&cfg)?;
    let eval = EvalConfig::of_run(&cfg);
    let policy = cal_train::collective::main_first(ranks.as_ref(), || source.fresh())?;
    // rollouts on vLLM without a URL: a server of our own, stopped when this returns
    cal_train::engine::server::refuse_own_server_on_ranks(&cfg, ranks.world())?;
    let server = serve_if_needed(&mut cfg, &policy, &out.with_extension("vllm"))?;
    let mut trainer = Trainer::new_on(cfg, policy, train, args.start(), ranks)?
        .with_held_out(test.clone(), eval.clone());
    if trainer.run()? == RunEnd::Interrupted {
        drop(server); // exit runs no destructors
        std::process::exit(130);
    }
    drop(server);
    if !main {
        return Ok(());
    }
    let graded = match trainer.held_out_now() {
        Some(g) => g.to_vec(),
        None => evaluate(&trainer.policy, &test, &eval, "eval")?,
    };
    let mut report = EvalReport::new(name, out.display().to_string(), graded, test.len());
    report.config = Some(config);
    report.prompt = Some(trainer.policy.prompt.clone());
    report.write(&out)?;
    let model_dir = out.join("model");
    load::export_hf(&trainer.policy.model, &trainer.policy.tok, &model_dir)?;
    // A LoRA run also writes its adapter alone, in PEFT's format, beside the merged model.
    let adapter = if trainer.policy.model.lora.is_some() {
        let dir = out.join("adapter");
        cal_model::peft::export_adapter(&trainer.policy.model, &dir)?;
        format!(", PEFT adapter to {}", dir.display())
    } else {
        String::new()
    };
    println!(
        "held-out accuracy {:.2}% ({}/{}); model exported to {}{adapter}",
        100.0 * report.accuracy.accuracy,
        report.accuracy.correct,
        report.accuracy.total,
        model_dir.display()
    );
    Ok(())
}

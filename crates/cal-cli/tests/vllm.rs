//! Rollouts on real vLLM servers (the CPU build, `scripts/install-vllm.sh`): a LoRA run
//! whose samples come from two servers, the adapter hot-loaded after every step, the
//! engine's log-probs against the trainer's, and failover when a server dies.
//!
//! The python comes from `CAL_VLLM_PYTHON`, or from running the install script (a
//! cached venv of a few GB). Each server is a child process, stopped when the test ends.
//! The tests run one at a time: a few vLLM servers at once would not fit 2 cores.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cal-grpo"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn vllm_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CAL_VLLM_PYTHON") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/install-vllm.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/install-vllm.sh");
    assert!(out.status.success(), "scripts/install-vllm.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A vLLM server on `port`, killed (with its process group) when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn start(python: &Path, model: &Path, port: u16, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(python);
        cmd.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(model)
            .args([
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--enable-lora",
            ])
            .args(["--max-lora-rank", "16", "--port", &port.to_string()])
            .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Server {
            child: cmd.spawn().expect("starting vLLM"),
            port,
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn models(&self) -> Option<String> {
        let out = Command::new("curl")
            .args(["-sf", &format!("{}/v1/models", self.url())])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_ready(&mut self, limit: Duration) {
        let t0 = Instant::now();
        while self.models().is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vLLM exited ({status}): {}", tail(&self.log));
            }
            assert!(
                t0.elapsed() < limit,
                "vLLM not ready after {limit:?}: {}",
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn kill(&mut self) {
        // SIGKILL the whole group: vLLM's engine core is a child of the API server
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two ports nobody listens on now (the OS picks them, both held until both are
/// known), so that runs side by side do not meet.
fn free_ports() -> [u16; 2] {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (l1, l2) = (bind(), bind());
    [
        l1.local_addr().unwrap().port(),
        l2.local_addr().unwrap().port(),
    ]
}

fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One vLLM test at a time.
/// The base the servers load: a quickly warmed tiny policy, exported as a Hugging Face
/// folder (`DIR/base/model`).
fn warm_base(dir: &Path, cache: &Path) -> PathBuf {
    let base_run = dir.join("base");
    let out = bin()
        .env("CAL_GRPO_CACHE", cache)
        .arg("train")
        .args(QUICK)
        .args(["--steps", "0", "--eval-samples", "2", "--output-dir"])
        .arg(&base_run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    base_run.join("model")
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The tiny policy, warmed quickly: what every run here starts from.
const QUICK: [&str; 6] = [
    "--sft-steps",
    "30",
    "--train-problems",
    "64",
    "--style",
    "chain",
];

/// A few small steps.
const SMALL: [&str; 10] = [
    "--prompts-per-step",
    "4",
    "--num-generations",
    "4",
    "--max-new-tokens",
    "48",
    "--num-samples",
    "32",
    "--eval-samples",
    "4",
];

/// Processes whose command line mentions `needle` (an orphaned server's model folder).
fn processes_with(needle: &Path) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "-f"])
        .arg(needle)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
#[ignore = "needs vLLM: bash scripts/install-vllm.sh (CAL_VLLM_PYTHON)"]
fn lora_rollouts_on_two_vllm_servers_sync_every_step_and_fail_over() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let python = vllm_python();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = warm_base(dir.path(), &cache);
    let [pa, pb] = free_ports();
    let mut a = Server::start(&python, &base, pa, dir.path().join("a.log"));
    let mut b = Server::start(&python, &base, pb, dir.path().join("b.log"));
    a.wait_ready(Duration::from_secs(600));
    b.wait_ready(Duration::from_secs(600));

    let run = dir.path().join("run");
    let urls = format!("{},{}", a.url(), b.url());
    let train_cmd = |steps: &str, resume: bool| {
        let mut cmd = bin();
        cmd.env("CAL_GRPO_CACHE", &cache)
            .arg("train")
            .arg("--model")
            .arg(&base)
            .args([
                "--lora-rank",
                "4",
                "--learning-rate",
                "1e-3",
                "--rollout-engine",
                "vllm",
            ])
            .args([
                "--rollout-url",
                &urls,
                "--steps",
                steps,
                "--save-every",
                "1",
            ])
            .args([
                "--prompts-per-step",
                "4",
                "--num-generations",
                "4",
                "--max-new-tokens",
                "48",
            ])
            .args(["--num-samples", "32", "--eval-samples", "4", "--output-dir"])
            .arg(&run);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let train = |steps: &str, resume: bool| train_cmd(steps, resume).output().unwrap();

    // two steps on both servers
    let out = train("2", false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&run);
    assert_eq!(m.len(), 2);
    // step 1 sampled with the trainer's own weights: the engine's log-probs match
    let diff = m[0]["rollout/logprob_abs_diff"].as_f64().unwrap();
    assert!(diff < 1e-3, "mean |logp_old - logq| = {diff} at step 1");
    assert!(m[1]["rollout/is_weight_mean"].as_f64().unwrap() > 0.5);
    for s in [&a, &b] {
        let models = s.models().unwrap();
        // the run's adapters are named after the run (`baseline-seed42-step-N`)
        assert!(models.contains("\"baseline-seed42-step-2\""), "{models}");
        assert!(
            !models.contains("-step-1\""),
            "the old adapter stays loaded: {models}"
        );
    }
    assert!(run.join("adapter/adapter_config.json").exists());

    // each sync checked: the servers give the trainer's log-probs on a fixed completion
    for row in &m {
        let d = row["rollout/sync_logprob_diff"].as_f64().unwrap();
        assert!(d < 1e-3, "served vs trainer after a sync: {d}");
    }

    // one server killed in the middle of a run: the run goes on with the other
    let mut running = {
        let out = train_cmd("4", true);
        let mut cmd = out;
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        cmd.spawn().unwrap()
    };
    let t0 = Instant::now();
    while metrics(&run).len() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "step 3 never logged"
        );
        assert!(running.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    b.kill();
    let out = running.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(metrics(&run).len(), 4);
    assert!(a.models().unwrap().contains("\"baseline-seed42-step-4\""));

    // none left: a clear error naming the server, the checkpoint kept, no hang
    a.kill();
    let t0 = Instant::now();
    let out = train("5", true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&a.port.to_string()), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(120),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(metrics(&run).len(), 4);
    assert!(run.join("checkpoints/step-000004").exists());
}

#[test]
#[ignore = "needs vLLM: bash scripts/install-vllm.sh (CAL_VLLM_PYTHON)"]
fn managed_server_full_fine_tuning_reloads_weights_and_stops_on_ctrl_c() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let python = vllm_python();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let train = |steps: &str, resume: bool| {
        let mut cmd = bin();
        cmd.env("CAL_GRPO_CACHE", dir.path().join("cache"))
            .env("CAL_VLLM_PYTHON", &python)
            .arg("train")
            .args(QUICK)
            .args(SMALL)
            // no --rollout-url: cal-grpo starts its own server; no LoRA: full weights
            .args([
                "--rollout-engine",
                "vllm",
                "--learning-rate",
                "1e-3",
                "--use-cal",
            ])
            .args(["--steps", steps, "--save-every", "1", "--output-dir"])
            .arg(&run);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let mut child = train("50", false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !run.join("metrics.jsonl").exists() || metrics(&run).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(600), "no second step");
        if let Some(s) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended early ({s}): {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Ctrl-C: the run saves its checkpoint and stops its server
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("vLLM ready on http://127.0.0.1:"), "{err}");
    let base = run.with_extension("vllm").join("base");
    assert!(base.join("model.safetensors").exists());
    let left = processes_with(&base);
    assert!(left.is_empty(), "orphaned server processes: {left:?}");

    let m = metrics(&run);
    assert!(m.len() >= 2);
    for row in &m {
        let diff = row["rollout/logprob_abs_diff"].as_f64().unwrap();
        let served = row["rollout/sync_logprob_diff"].as_f64().unwrap();
        let moved = row["rollout/sync_logprob_shift"].as_f64().unwrap();
        // every step sampled with the weights the trainer had: the reload took
        assert!(diff < 1e-3, "mean |logp_old - logq| = {diff}");
        // and the check could tell: the step moved the probe far more than that
        assert!(
            served < 1e-3 && moved > 20.0 * served.max(1e-5),
            "served {served}, moved {moved}"
        );
    }

    // --resume starts a new server on the run's start, then syncs the checkpoint's weights
    let steps = (m.len() + 1).to_string();
    let out = train(&steps, true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&run);
    assert_eq!(m.len().to_string(), steps);
    let last = m.last().unwrap();
    assert!(
        last["rollout/logprob_abs_diff"].as_f64().unwrap() < 1e-3,
        "{last}"
    );
    assert!(processes_with(&base).is_empty());
}

#[test]
#[ignore = "needs vLLM: bash scripts/install-vllm.sh (CAL_VLLM_PYTHON)"]
fn experiment_arms_share_one_managed_server() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let python = vllm_python();
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp");
    let out = bin()
        .env("CAL_GRPO_CACHE", dir.path().join("cache"))
        .env("CAL_VLLM_PYTHON", &python)
        .arg("experiment")
        .args(QUICK)
        .args(SMALL)
        .args([
            "--rollout-engine",
            "vllm",
            "--lora-rank",
            "4",
            "--steps",
            "2",
        ])
        .args(["--jobs", "2", "--output-dir"])
        .arg(&exp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // one server for both arms, each arm's adapters under its own names
    assert_eq!(err.matches("vLLM ready on").count(), 1, "{err}");
    let log = std::fs::read_to_string(exp.join("vllm/server.log")).unwrap();
    for arm in ["baseline", "cal"] {
        assert!(
            log.contains(&format!("{arm}-seed42-step-2")),
            "{arm} never synced"
        );
        // the training steps' rows (the held-out evaluations log rows of their own)
        let m: Vec<_> = metrics(&exp.join(format!("seed-42/{arm}")))
            .into_iter()
            .filter(|r| r.get("rollout/logprob_abs_diff").is_some())
            .collect();
        assert_eq!(m.len(), 2);
        assert!(m[0]["rollout/logprob_abs_diff"].as_f64().unwrap() < 1e-3);
    }
    assert!(exp.join("summary.md").exists());
    assert!(processes_with(&exp.join("vllm/base")).is_empty());
}

/// Data parallel on shared servers: `mpirun -np 2 cal-grpo train` with LoRA rollouts on
/// one vLLM server against one process on the same server. Rank 0 alone loads each
/// step's adapter; both ranks' requests name it, and every rank's check of the served
/// weights passes. With per-group request seeds the first step's samples are the same
/// as one process's (both from the same start), and the runs end close.
#[cfg(feature = "mpi")]
#[test]
#[ignore = "needs vLLM (bash scripts/install-vllm.sh) and mpirun"]
fn two_ranks_share_vllm_servers_and_match_one_process() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let python = vllm_python();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let base = warm_base(dir.path(), &cache);
    let [port, _] = free_ports();
    let mut server = Server::start(&python, &base, port, dir.path().join("server.log"));
    server.wait_ready(Duration::from_secs(600));
    let run = |np: usize| -> PathBuf {
        let out_dir = dir.path().join(format!("np{np}"));
        let mut cmd = if np == 1 {
            bin()
        } else {
            let mut c = Command::new("mpirun");
            c.args(["-np", &np.to_string(), "--oversubscribe"])
                .args(["--mca", "btl", "self,vader,tcp"])
                .arg(env!("CARGO_BIN_EXE_cal-grpo"));
            c
        };
        let o = cmd
            .env("CAL_GRPO_CACHE", &cache)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
            .args(["train", "--model"])
            .arg(&base)
            .args(["--lora-rank", "4", "--learning-rate", "1e-3"])
            .args(["--rollout-engine", "vllm", "--rollout-url", &server.url()])
            .args([
                "--rollout-seeds",
                "group",
                "--steps",
                "2",
                "--save-every",
                "1",
            ])
            .args(SMALL)
            .args(["--weight-check-every", "1", "--output-dir"])
            .arg(&out_dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{np} rank(s): {err}");
        if np > 1 {
            assert!(
                err.contains("data parallel: 2 ranks, 2 prompts each"),
                "{err}"
            );
        }
        out_dir
    };
    let (one, two) = (run(1), run(2));
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!((m1.len(), m2.len()), (2, 2));
    // step 1: the same start and the same per-group seeds, so the same samples
    for k in ["reward/accuracy", "completion/mean_length"] {
        assert_eq!(m1[0][k], m2[0][k], "step 1: {k}");
    }
    for (a, b) in m1.iter().zip(&m2) {
        // every step's sync was checked on every rank against the trainer's log-probs
        let d = b["rollout/sync_logprob_diff"].as_f64().unwrap();
        assert!(d < 1e-3, "2 ranks, served vs trainer after a sync: {d}");
        let (x, y) = (
            a["loss/total"].as_f64().unwrap(),
            b["loss/total"].as_f64().unwrap(),
        );
        if a["step"] == 1 {
            assert!(
                (x - y).abs() <= 1e-3 * x.abs().max(1e-3),
                "step 1 loss {x} vs {y}"
            );
        }
    }
    assert!(server.models().unwrap().contains("-step-2\""));
    // one server of the user's: each rank starting its own is refused, naming the flag
    let o = Command::new("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_cal-grpo"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("CAL_GRPO_CACHE", &cache)
        .args(["train", "--model"])
        .arg(&base)
        .args(["--rollout-engine", "vllm", "--steps", "1", "--output-dir"])
        .arg(dir.path().join("refused"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--rollout-url"),
        "{err}"
    );
}

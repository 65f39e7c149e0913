//! A vLLM server this process starts and owns (`rollout.engine = "vllm"` without URLs).
//!
//! It serves an exported Hugging Face folder on a port the OS picks, bound to
//! 127.0.0.1, with runtime LoRA loading and the dev routes (`/collective_rpc`,
//! `/reset_prefix_cache`) that full-weight syncs use. It runs in its own process group
//! so that a terminal's Ctrl-C reaches only the trainer, which saves its checkpoint and
//! then stops the server; dropping the handle stops the whole group (vLLM's engine core
//! is a child of its API server), and the kernel stops the server if this process dies
//! without dropping it (`PR_SET_PDEATHSIG`). Its output goes to a log file whose tail
//! is quoted when it fails to start.

use crate::config::{RolloutEngine, RunConfig};
use crate::policy::Policy;
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// A vLLM install's python (`None`: [`default_python`]).
    pub python: Option<PathBuf>,
    /// The Hugging Face folder served as the base model.
    pub model_dir: PathBuf,
    /// The policy's LoRA rank (0: full fine-tuning, no LoRA slots).
    pub lora_rank: usize,
    /// Appended to the server's command line (they win over ours: `--dtype bfloat16`).
    pub extra_args: Vec<String>,
    /// Where the server's stdout and stderr go.
    pub log: PathBuf,
    /// How long it may take to answer `/health`.
    pub ready_timeout: Duration,
}

/// A running server, stopped when dropped.
pub struct ManagedServer {
    child: Child,
    url: String,
    log: PathBuf,
}

/// `$CAL_VLLM_PYTHON`, else the venv `scripts/install-vllm.sh` installs into.
pub fn default_python() -> PathBuf {
    if let Some(p) = std::env::var_os("CAL_VLLM_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("CAL_VLLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(&std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                        .join(".cache")
                });
            cache.join("cal-grpo/vllm-venv")
        });
    venv.join("bin/python")
}

/// vLLM accepts only these LoRA ranks as `--max-lora-rank`.
const LORA_RANKS: [usize; 9] = [1, 8, 16, 32, 64, 128, 256, 320, 512];

/// The smallest rank vLLM accepts that holds `rank`.
pub fn max_lora_rank(rank: usize) -> Result<usize> {
    LORA_RANKS
        .iter()
        .copied()
        .find(|&r| r >= rank)
        .with_context(|| format!("vLLM serves LoRA ranks up to 512, the policy's is {rank}"))
}

impl ManagedServer {
    /// Starts the server and waits until it answers `/health` (or exits, or times out:
    /// errors that quote the log's tail).
    pub fn start(spec: &ServerSpec) -> Result<Self> {
        let python = spec.python.clone().unwrap_or_else(default_python);
        check_vllm(&python)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?;
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(&spec.model_dir)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // the trainer computes in f32 on a CPU; the log-probs it compares are f32 too
            .args(["--dtype", "float32"]);
        if spec.lora_rank > 0 {
            cmd.args(["--enable-lora", "--max-lora-rank"])
                .arg(max_lora_rank(spec.lora_rank)?.to_string());
        }
        // A group's G samples share their prompt: the engine's prefix cache prefills it
        // once (explicit, since older CPU builds left it off), unless the user says no.
        if !spec.extra_args.iter().any(|a| a.contains("prefix-caching")) {
            cmd.arg("--enable-prefix-caching");
        }
        cmd.args(&spec.extra_args)
            .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
            .env("VLLM_SERVER_DEV_MODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("VLLM_CPU_KVCACHE_SPACE").is_none() {
            // GiB of KV cache on a CPU build; its own default takes a share of all memory
            cmd.env("VLLM_CPU_KVCACHE_SPACE", "1");
        }
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting vLLM with {}", python.display()))?;
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: spec.log.clone(),
        };
        eprintln!(
            "started vLLM on {} (model {}, log {})",
            server.url,
            spec.model_dir.display(),
            spec.log.display()
        );
        server.wait_ready(spec.ready_timeout)?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let t0 = Instant::now();
        let health = format!("{}/health", self.url);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "vLLM exited during start-up ({status}); the end of {}:\n{}",
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            if http_ok(&health) {
                eprintln!(
                    "vLLM ready on {} after {:.0}s",
                    self.url,
                    t0.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if t0.elapsed() > limit {
                bail!(
                    "vLLM did not answer {health} within {:.0}s; the end of {}:\n{}",
                    limit.as_secs_f64(),
                    self.log.display(),
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// SIGTERM to the server's process group, SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let pgid = -(self.child.id() as libc::pid_t);
        // SAFETY: signals to a process group this handle created.
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // whatever is left of the group (the engine core), and reap the server
        unsafe { libc::kill(pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ManagedServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A fast check that `python` has vLLM (a plain `import vllm` takes seconds).
fn check_vllm(python: &Path) -> Result<()> {
    let hint = "install it with `bash scripts/install-vllm.sh` (it prints the python \
                to pass as --server-python or CAL_VLLM_PYTHON), or pass --rollout-url for \
                servers you run";
    let out = Command::new(python)
        .args([
            "-c",
            "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(_) => bail!("{} has no vLLM: {hint}", python.display()),
        Err(e) => bail!("no python at {} ({e}): {hint}", python.display()),
    }
}

/// GET `url` answers 2xx (a plain HTTP/1.0 request: no runtime needed for a poll).
fn http_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2'
}

fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The run samples on vLLM and names no server: it needs one of its own.
pub fn wanted(cfg: &RunConfig) -> bool {
    cfg.rollout.engine == RolloutEngine::Vllm && cfg.rollout.urls.is_empty()
}

/// Data parallel: the ranks share servers they are given, never one of their own each
/// (N copies of the model, each synced by one rank alone).
pub fn refuse_own_server_on_ranks(cfg: &RunConfig, world: usize) -> anyhow::Result<()> {
    if world > 1 && wanted(cfg) {
        anyhow::bail!(
            "data-parallel rollouts on vLLM share servers started beforehand: start them and \
             pass --rollout-url (each of the {world} ranks starting its own would load {world} \
             copies of the model)"
        );
    }
    Ok(())
}

/// With `rollout.engine = "vllm"` and no URLs: exports `policy` (the run's start,
/// before any adapter) to `dir/base`, starts a server on it (log `dir/server.log`)
/// and points `cfg` at it. `None` when the run uses local generation or given servers.
pub fn serve_if_needed(
    cfg: &mut RunConfig,
    policy: &Policy,
    dir: &Path,
) -> Result<Option<ManagedServer>> {
    if !wanted(cfg) {
        return Ok(None);
    }
    // before writing anything: a missing vLLM is the likely first error
    check_vllm(
        &cfg.rollout
            .server_python
            .clone()
            .unwrap_or_else(default_python),
    )?;
    let base = dir.join("base");
    // full fine-tuning reloads every weight in place, a tied head included
    let untie = cfg.model.lora.rank == 0;
    cal_model::load::export_hf_with(&policy.model, &policy.tok, &base, untie)?;
    let server = ManagedServer::start(&ServerSpec {
        python: cfg.rollout.server_python.clone(),
        model_dir: base,
        lora_rank: cfg.model.lora.rank,
        extra_args: cfg.rollout.server_args.clone(),
        log: dir.join("server.log"),
        ready_timeout: Duration::from_secs(900),
    })?;
    cfg.rollout.urls = vec![server.url().to_string()];
    Ok(Some(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_ranks_round_up_to_what_vllm_takes() {
        assert_eq!(max_lora_rank(4).unwrap(), 8);
        assert_eq!(max_lora_rank(8).unwrap(), 8);
        assert_eq!(max_lora_rank(9).unwrap(), 16);
        assert!(max_lora_rank(513).is_err());
    }

    #[test]
    fn a_python_without_vllm_is_named_with_the_install_script() {
        let err = check_vllm(Path::new("/nonexistent/python")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("/nonexistent/python") && msg.contains("install-vllm.sh"));
        // a python that runs but has no vLLM: the system's own, if it has none
        if let Ok(o) = Command::new("python3").args(["-c", "import vllm"]).output() {
            if !o.status.success() {
                let msg = format!("{:#}", check_vllm(Path::new("python3")).unwrap_err());
                assert!(msg.contains("has no vLLM"), "{msg}");
            }
        }
    }

    #[test]
    fn a_server_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        // a "python" that has vllm (passes the check) but dies on start
        let fake = dir.path().join("python");
        std::fs::write(
            &fake,
            "#!/bin/sh\ncase \"$2\" in *find_spec*) exit 0;; esac\necho 'boom: no model' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let spec = ServerSpec {
            python: Some(fake),
            model_dir: dir.path().to_path_buf(),
            lora_rank: 8,
            extra_args: vec![],
            log: dir.path().join("vllm.log"),
            ready_timeout: Duration::from_secs(30),
        };
        let msg = format!("{:#}", ManagedServer::start(&spec).err().unwrap());
        assert!(
            msg.contains("exited during start-up") && msg.contains("boom: no model"),
            "{msg}"
        );
    }
}

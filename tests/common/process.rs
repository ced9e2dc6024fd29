//! `warren` as a separate process: what a deployment runs, and the only way to
//! see one node's own memory (RSS) or kill it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{WAIT, amqp_url, on_broker};

/// Where spawned processes' logs go, for reading after a failure.
pub fn log_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.log"))
}

/// A `warren` process; killed when dropped.
pub struct Node {
    pub child: Child,
    pub addr: SocketAddr,
    pub id: String,
}

impl Node {
    /// Start `warren` listening on `listen` (port 0: any free port), on the
    /// test broker, with `args` after the common ones.
    pub fn spawn(prefix: &str, id: &str, listen: &str, args: &[&str]) -> Node {
        on_broker(prefix);
        let log = std::fs::File::create(log_file(&format!("{prefix}.{id}"))).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["--listen", listen])
            .args([
                "--static-dir",
                concat!(env!("CARGO_MANIFEST_DIR"), "/static"),
            ])
            .args(["--prefix", prefix, "--node-id", id])
            .args(["--amqp-connections", "2"])
            // Every test client is 127.0.0.1: the per-address limits must not
            // count them as one.
            .args(["--max-connections-per-ip", "100000"])
            .args(["--connections-per-ip-per-sec", "100000"])
            // No durable history stream left on the shared broker.
            .args(["--history-per-room", "0"])
            .args(args)
            .env("AMQP_URL", amqp_url())
            .env("WARREN_SESSION_SECRET", format!("secret-{prefix}"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("warren starts");
        // The first line on stdout is `warren listening on http://ADDR`.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("warren listening on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?} from {id}"));
        Node {
            child,
            addr,
            id: id.to_owned(),
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.id);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).expect("the node is running")
    }

    /// Wait for the process to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Lift this process's soft open-file limit to the hard one (the soft one is
/// often 1,024): every client socket is a descriptor. Processes spawned
/// afterwards (nodes, HAProxy) inherit it.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed to them.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    assert!(raised, "cannot raise the open-file limit");
}

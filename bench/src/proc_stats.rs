//! CPU seconds and memory of the processes under test, read from `/proc`.
//!
//! A [`CpuWatch`] snapshots `utime + stime` of the Warren node(s), the broker
//! (`beam.smp`) and the bench itself when the load starts and again when it ends,
//! so each figure covers the measured interval only.

use std::fs;

/// Seconds of CPU (user + system) `pid` has used so far; `None` if it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the
    // last ')'. utime and stime are fields 14 and 15, i.e. 12 and 13 from there.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The broker's Erlang VM, found by its command name.
pub fn find_broker() -> Option<u32> {
    find_process("beam.smp")
}

/// The Redis server the Socket.IO peer's adapter publishes through: the
/// socketio target's broker.
pub fn find_redis() -> Option<u32> {
    find_process("redis-server")
}

/// The first process whose `comm` is `name`.
fn find_process(name: &str) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// Busy CPU seconds of the whole machine so far, all cores, from `/proc/stat`.
fn machine_busy_secs() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .take(8)
        .filter_map(|t| t.parse().ok())
        .collect();
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy / clock_ticks())
}

/// Wait until the rest of the machine is quiet: at most `max_busy` cores busy over
/// one second, not counting the processes under test. Gives up after `patience`.
/// Returns whether it got quiet. A benchmark on a shared two-core machine is
/// worthless while a compiler runs beside it.
pub async fn wait_for_quiet(
    watch: &CpuWatch,
    max_busy: f64,
    patience: std::time::Duration,
) -> bool {
    let give_up = std::time::Instant::now() + patience;
    let mut told = false;
    loop {
        let before = watch.snapshot();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let others = (watch.snapshot() - before).others();
        if others <= max_busy {
            return true;
        }
        if std::time::Instant::now() >= give_up {
            eprintln!(
                "warren-bench: other processes still use {others:.2} cores; measuring anyway"
            );
            return false;
        }
        if !told {
            eprintln!(
                "warren-bench: waiting for other processes ({others:.2} cores busy) to finish"
            );
            told = true;
        }
    }
}

/// CPU seconds of the servers, the broker, the bench and the whole machine at one
/// moment. The machine's figure exposes anything else that ran during a
/// measurement (a compiler, another test) and so makes a disturbed run visible.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    pub servers: f64,
    pub broker: f64,
    pub bench: f64,
    pub machine: f64,
}

impl CpuSnapshot {
    /// CPU seconds spent by processes other than the servers, broker and bench.
    pub fn others(&self) -> f64 {
        (self.machine - self.servers - self.broker - self.bench).max(0.0)
    }
}

#[derive(Debug, Clone)]
pub struct CpuWatch {
    pub servers: Vec<u32>,
    pub broker: Option<u32>,
}

impl CpuWatch {
    pub fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            servers: self.servers.iter().filter_map(|pid| cpu_secs(*pid)).sum(),
            broker: self.broker.and_then(cpu_secs).unwrap_or(0.0),
            bench: cpu_secs(std::process::id()).unwrap_or(0.0),
            machine: machine_busy_secs().unwrap_or(0.0),
        }
    }

    /// Peak RSS of the servers since they started, summed (KiB).
    pub fn servers_peak_rss_kib(&self) -> Option<u64> {
        self.sum_status("VmHWM")
    }

    /// Current RSS of the servers, summed (KiB).
    pub fn servers_rss_kib(&self) -> Option<u64> {
        self.sum_status("VmRSS")
    }

    fn sum_status(&self, field: &str) -> Option<u64> {
        if self.servers.is_empty() {
            return None;
        }
        self.servers.iter().map(|pid| status_kib(*pid, field)).sum()
    }
}

impl std::ops::Sub for CpuSnapshot {
    type Output = CpuSnapshot;

    fn sub(self, earlier: CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            servers: self.servers - earlier.servers,
            broker: self.broker - earlier.broker,
            bench: self.bench - earlier.bench,
            machine: self.machine - earlier.machine,
        }
    }
}

/// Lift this process's open-file limit to its hard limit: every connection is a
/// descriptor, and the connections scenario opens thousands.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
    }
}

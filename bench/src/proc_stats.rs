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
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU seconds of the servers, the broker and the bench at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    pub servers: f64,
    pub broker: f64,
    pub bench: f64,
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
        self.servers
            .iter()
            .map(|pid| status_kib(*pid, field))
            .sum()
    }
}

impl std::ops::Sub for CpuSnapshot {
    type Output = CpuSnapshot;

    fn sub(self, earlier: CpuSnapshot) -> CpuSnapshot {
        CpuSnapshot {
            servers: self.servers - earlier.servers,
            broker: self.broker - earlier.broker,
            bench: self.bench - earlier.bench,
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
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
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

//! Helpers shared by the benches: ids, machine description, memory readings.
//!
//! Each bench includes this module with `mod common;` and uses a subset of it.

#![allow(dead_code)] // Every bench uses only some of these helpers.

use std::path::Path;

pub mod anc;
pub mod http;

/// The benches' error type.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The splitmix64 finaliser: a bijection on u64, so distinct `i` give distinct ids.
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A UUID-shaped id, random-looking like CommCare's v4 ids (so keys land all over the trees).
pub fn uuid_like(kind: u32, i: u64) -> String {
    let i = mix(i ^ u64::from(kind));
    format!(
        "{kind:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (i >> 48) & 0xffff,
        (i >> 36) & 0xfff,
        (i >> 24) & 0xfff,
        i & 0xffff_ffff_ffff
    )
}

/// `VmRSS` and `VmHWM` of this process in kB.
pub fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0+); false when the kernel refuses.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = std::fs::read_to_string("/proc/version").unwrap_or_default();
    let kernel = version.split_whitespace().nth(2).unwrap_or("?").to_owned();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!(
        "nproc {cpus} ({model}), {:.1} GB RAM, Linux {kernel}, tempdir {}",
        mem as f64 / 1e6,
        std::env::temp_dir().display()
    )
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> BenchResult<T>
where
    T::Err: std::error::Error + 'static,
{
    match std::env::var(name) {
        Ok(v) => Ok(v.parse()?),
        Err(_) => Ok(default),
    }
}

/// CPU seconds (user + system) the whole process used so far.
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

/// CPU seconds (user + system) of the calling thread so far.
pub fn thread_cpu_seconds() -> f64 {
    cpu_seconds("/proc/thread-self/stat")
}

/// CPU seconds (user + system) process `pid` used so far; 0 once it is gone.
pub fn pid_cpu_seconds(pid: u32) -> f64 {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of the whole machine so far, all cores added up: (busy, busy + idle), from the
/// first line of `/proc/stat` (busy: user, nice, system, irq, softirq, steal; idle: idle,
/// iowait). Over an interval, busy / (busy + idle) × cores is how many cores were in use, by
/// anyone.
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / 100.0;
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), as printed there.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every process's name and CPU seconds so far, by pid (what [`others_busy`] compares).
pub fn all_process_cpu() -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("?", |(n, _)| n)
            .to_owned();
        out.insert(pid, (name, cpu_seconds(&format!("/proc/{pid}/stat"))));
    }
    out
}

/// The processes other than `ours` that used the most CPU between two [`all_process_cpu`]
/// snapshots, as `name pid: seconds`, busiest first, at most `top`; and their CPU seconds
/// added up (the processes that ended in between are not seen).
pub fn others_busy(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
    ours: &[u32],
    top: usize,
) -> (String, f64) {
    let mut used: Vec<(f64, u32, &str)> = after
        .iter()
        .filter(|(pid, _)| !ours.contains(pid))
        .map(|(pid, (name, cpu))| {
            let was = before.get(pid).map_or(0.0, |(_, c)| *c);
            (cpu - was, *pid, name.as_str())
        })
        .filter(|(d, _, _)| *d > 0.0)
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total = used.iter().map(|u| u.0).sum();
    let named = used
        .iter()
        .take(top)
        .map(|(d, pid, name)| format!("{name} {pid}: {d:.1} s"))
        .collect::<Vec<_>>()
        .join(", ");
    (
        if named.is_empty() {
            "none".into()
        } else {
            named
        },
        total,
    )
}

/// CPU use over one phase of a bench: this process, the named processes it runs beside (its
/// NATS nodes, its server children), the whole machine, and everyone else.
pub struct CpuWatch {
    own: f64,
    pids: Vec<(String, u32, f64)>,
    machine: (f64, f64),
    all: std::collections::HashMap<u32, (String, f64)>,
}

/// What a [`CpuWatch`] saw, in CPU seconds.
pub struct CpuUse {
    /// This process.
    pub own: f64,
    /// Each named process, in the order given.
    pub pids: Vec<(String, f64)>,
    /// The machine, all cores: busy, and busy + idle.
    pub busy: f64,
    pub total: f64,
    /// Every other process, added up, and the busiest by name.
    pub others: f64,
    pub others_named: String,
}

impl CpuWatch {
    pub fn start(pids: &[(String, u32)]) -> CpuWatch {
        CpuWatch {
            own: process_cpu_seconds(),
            pids: pids
                .iter()
                .map(|(name, pid)| (name.clone(), *pid, pid_cpu_seconds(*pid)))
                .collect(),
            machine: machine_cpu_seconds(),
            all: all_process_cpu(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let (busy, total) = machine_cpu_seconds();
        let mut ours: Vec<u32> = self.pids.iter().map(|p| p.1).collect();
        ours.push(std::process::id());
        let (others_named, others) = others_busy(&self.all, &all_process_cpu(), &ours, 3);
        CpuUse {
            own: process_cpu_seconds() - self.own,
            pids: self
                .pids
                .iter()
                .map(|(name, pid, was)| (name.clone(), pid_cpu_seconds(*pid) - was))
                .collect(),
            busy: busy - self.machine.0,
            total: total - self.machine.1,
            others,
            others_named,
        }
    }
}

impl CpuUse {
    /// CPU seconds of the named processes whose name starts with `prefix`.
    pub fn of(&self, prefix: &str) -> f64 {
        self.pids
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|p| p.1)
            .sum()
    }

    /// Cores busy on average, by anyone.
    pub fn cores_busy(&self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if self.total > 0.0 {
            self.busy / self.total * cores
        } else {
            0.0
        }
    }

    /// One line: `CPU s: <own_name> 1.2, n1 0.8, … | machine busy 1.93 of 2 cores | others
    /// 0.4 (rustc 123: 0.3 s, …)`.
    pub fn line(&self, own_name: &str) -> String {
        let mut out = format!("CPU s: {own_name} {:.2}", self.own);
        for (name, cpu) in &self.pids {
            out.push_str(&format!(", {name} {cpu:.2}"));
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        out.push_str(&format!(
            " | machine busy {:.2} of {cores} cores | others {:.2} ({})",
            self.cores_busy(),
            self.others,
            self.others_named
        ));
        out
    }
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux configuration the benches run on.
    ticks as f64 / 100.0
}

/// The numbers a child process printed on its stdout line starting with `tag` and a space.
pub fn child_fields(stdout: &str, tag: &str) -> Vec<f64> {
    let prefix = format!("{tag} ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes this process caused to be written to storage so far (`write_bytes` of `/proc/self/io`).
pub fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Mobile workers in the benches' project space.
pub const USERS: u64 = 200;
/// Case-sharing groups they are spread over (user `u` is in group `u % GROUPS`).
pub const GROUPS: u64 = 40;

/// Id of user `u`.
pub fn user(u: u64) -> String {
    format!("u-{u:03}")
}

/// Id of the case-sharing group of user `u` (or of group `u` when `u < GROUPS`).
pub fn group(u: u64) -> String {
    format!("g-{:02}", u % GROUPS)
}

/// `EngineConfig::raw_out_of_line` for the benches: on, unless `CASELEDGER_BENCH_RAW=inline`.
pub fn raw_out_of_line() -> bool {
    std::env::var("CASELEDGER_BENCH_RAW").as_deref() != Ok("inline")
}

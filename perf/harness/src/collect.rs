//! The collector: turns what a run's nodes reported into measures.
//!
//! - goodput: payload delivered over the time from the first byte sent to
//!   the last byte delivered ([`goodput_mbps`]), and a steady-state figure
//!   over many round trips ([`steady_mbps`]); neither may exceed the link's
//!   rate (see each);
//! - goodput over time: the receiver's `progress` lines, stamped when the
//!   harness read them, binned;
//! - time to 90 %: the first instant (since the sender started) at which the
//!   goodput over the last second reached 90 % of capacity × (1 − loss);
//! - recovery after an outage: from the end of the outage to the first
//!   half-second window wholly after it at 90 % of the link;
//! - CPU, two figures ([`CpuSnapshot`], [`cpu_spent`]): the machine's busy
//!   time over the run (`/proc/stat`) less the harness process's user time
//!   (its bookkeeping and the link model, which run in this process) and less
//!   what other user processes ran meanwhile; and the contenders' processes
//!   alone (`getrusage(RUSAGE_CHILDREN)`), which misses kernel work the
//!   kernel did for them while another task ran;
//! - latency percentiles (nearest rank) of rpc round trips or live delivery.

use std::collections::HashMap;
use std::time::Instant;

use nix::sys::resource::{getrusage, UsageWho};
use serde::Serialize;

fn tv(t: nix::sys::time::TimeVal) -> f64 {
    t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
}

/// CPU seconds (user + system) of all reaped children so far.
pub fn children_cpu_s() -> f64 {
    match getrusage(UsageWho::RUSAGE_CHILDREN) {
        Ok(u) => tv(u.user_time()) + tv(u.system_time()),
        Err(_) => f64::NAN,
    }
}

/// The first line of `/proc/stat`: the machine's CPU time by kind, in clock
/// ticks (`USER_HZ`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl HostTicks {
    /// Parses a `/proc/stat` `cpu` line (the machine's, not a `cpuN` one).
    pub fn parse(line: &str) -> Option<HostTicks> {
        let mut it = line.split_whitespace();
        if it.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = it.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let &[user, nice, system, idle, iowait, irq, softirq, steal] = v.as_slice() else {
            return None;
        };
        Some(HostTicks {
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
        })
    }

    /// This machine's, now, with the CPUs online (its `cpuN` lines).
    pub fn read() -> Option<(HostTicks, u32)> {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let cpus = s
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Some((HostTicks::parse(s.lines().next()?)?, cpus as u32))
    }

    /// Ticks in which no CPU of this machine ran anything: idle and iowait
    /// (no work), and steal (the hypervisor ran someone else's).
    pub fn not_running(&self) -> u64 {
        self.idle + self.iowait + self.steal
    }
}

/// Processes' CPU ticks by (pid, start time).
pub type ProcTimes = HashMap<(i32, u64), u64>;

/// `PF_KTHREAD` in `/proc/PID/stat`'s flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcTicks {
    pub pid: i32,
    pub ppid: i32,
    /// Start time (ticks since boot): with the pid, names one process
    /// across a reused pid.
    pub start: u64,
    /// utime + stime of all its threads, ticks.
    pub ticks: u64,
    pub kernel_thread: bool,
}

impl ProcTicks {
    /// Parses a `/proc/PID/stat` line (the name in parentheses may hold
    /// spaces and parentheses: the fields are counted after the last `)`).
    pub fn parse(text: &str) -> Option<ProcTicks> {
        let pid = text.split_whitespace().next()?.parse().ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        // Fields from 3 (state) on: index 0 here is field 3.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
        Some(ProcTicks {
            pid,
            ppid: f.get(1)?.parse().ok()?,
            start: n(22)?,
            ticks: n(14)? + n(15)?,
            kernel_thread: n(9)? & PF_KTHREAD != 0,
        })
    }
}

/// Every process's CPU ticks now, from `/proc` (those gone between listing
/// and reading are left out).
pub fn all_procs() -> Vec<ProcTicks> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| ProcTicks::parse(&t))
        .collect()
}

/// User processes outside `own`'s tree (not `own`, not below it, not kernel
/// threads), keyed by (pid, start), with their CPU ticks.
pub fn others(procs: &[ProcTicks], own: i32) -> ProcTimes {
    let parent: HashMap<i32, i32> = procs.iter().map(|p| (p.pid, p.ppid)).collect();
    let ours = |mut pid: i32| {
        // A parent chain ends at init (1) or the kernel (0, 2); the bound
        // guards against a chain read while pids were reused.
        for _ in 0..64 {
            if pid == own {
                return true;
            }
            match parent.get(&pid) {
                Some(&pp) if pp > 0 => pid = pp,
                _ => return false,
            }
        }
        false
    };
    procs
        .iter()
        .filter(|p| !p.kernel_thread && !ours(p.pid))
        .map(|p| ((p.pid, p.start), p.ticks))
        .collect()
}

/// How often [`OthersWatch`] reads `/proc`.
pub const OTHERS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Other processes followed through a run: `/proc` read every
/// [`OTHERS_EVERY`], so a process that exits before the run ends (a
/// compiler another user's build started) still counts up to its last
/// reading. What the watch itself costs the kernel is measured and taken
/// out ([`OthersWatch::finish`]).
pub struct OthersWatch {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<(ProcTimes, f64)>,
}

impl OthersWatch {
    /// Starts reading.
    pub fn start() -> OthersWatch {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let own = std::process::id() as i32;
        let thread = std::thread::spawn(move || {
            let mut seen = HashMap::new();
            loop {
                seen.extend(others(&all_procs(), own));
                match stopped.recv_timeout(OTHERS_EVERY) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
            }
            // This thread's system time (its user time is in the harness's,
            // which the fair figure leaves out anyway).
            let sys_s = std::fs::read_to_string("/proc/thread-self/stat")
                .ok()
                .and_then(|t| {
                    let f: Vec<&str> = t[t.rfind(')')? + 1..].split_whitespace().collect();
                    f.get(15 - 3)?.parse::<u64>().ok()
                })
                .map_or(0.0, |ticks| ticks as f64 * clock_tick_s().unwrap_or(0.0));
            (seen, sys_s)
        });
        OthersWatch { stop, thread }
    }

    /// Stops reading; every process seen, at its last reading, and the
    /// watch's own system seconds.
    pub fn finish(self) -> (ProcTimes, f64) {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_default()
    }
}

/// Seconds per `/proc` clock tick (1 / `USER_HZ`).
fn clock_tick_s() -> Option<f64> {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .map(|hz| 1.0 / hz as f64)
}

/// What the CPU counters read at one instant, for [`cpu_spent`].
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// The machine's CPU time (`/proc/stat`).
    pub host: HostTicks,
    /// The monotonic clock when `host` was read, seconds.
    pub mono_s: f64,
    /// CPUs online.
    pub cpus: u32,
    /// This process's user and system seconds (`RUSAGE_SELF`: the harness,
    /// with the link emulator's threads).
    pub own_user_s: f64,
    pub own_sys_s: f64,
    /// Seconds of the reaped children (`RUSAGE_CHILDREN`).
    pub children_s: f64,
    /// Other user processes' ticks ([`others`]).
    pub others: ProcTimes,
    /// Seconds per tick of `/proc` (1 / `USER_HZ`).
    pub tick_s: f64,
}

impl CpuSnapshot {
    /// Reads the counters now; `None` where `/proc/stat` or `getrusage` is
    /// not there.
    pub fn take() -> Option<CpuSnapshot> {
        let (host, cpus) = HostTicks::read()?;
        let mono_s = crate::node::mono_ns() as f64 / 1e9;
        let own = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let tick_s = clock_tick_s()?;
        Some(CpuSnapshot {
            host,
            mono_s,
            cpus,
            own_user_s: tv(own.user_time()),
            own_sys_s: tv(own.system_time()),
            children_s: children_cpu_s(),
            others: others(&all_procs(), std::process::id() as i32),
            tick_s,
        })
    }

    /// Adds what an [`OthersWatch`] saw: processes gone by now count at their
    /// last reading; its own system time leaves the harness's.
    pub fn with_watch(mut self, (seen, watch_sys_s): (ProcTimes, f64)) -> Self {
        for (k, t) in seen {
            self.others.entry(k).or_insert(t);
        }
        self.own_sys_s -= watch_sys_s;
        self
    }
}

/// CPU seconds spent between two [`CpuSnapshot`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuSpent {
    /// The fair figure: `host_busy_s − harness_user_s − others_s`, at
    /// least 0. Every CPU second the contender cost, in its processes or in
    /// the kernel on its behalf wherever that ran (softirq on any CPU, the
    /// network stack inside the emulator's socket or TUN calls, kernel
    /// threads), plus the emulator's own kernel time and what other
    /// processes ran unseen ([`cpu_spent`]).
    pub fair_s: f64,
    /// The contender's processes alone (`RUSAGE_CHILDREN`).
    pub proc_s: f64,
    /// The machine's busy time: the CPUs' time over the interval less what
    /// `/proc/stat` counts idle, iowait and steal ([`HostTicks::not_running`]).
    pub host_busy_s: f64,
    /// The harness process's user time (not contender work: subtracted).
    pub harness_user_s: f64,
    /// The harness process's system time: the emulator's socket or TUN
    /// calls, with the contender's network-stack work the kernel does inside
    /// them (kept in the fair figure; the two do not separate).
    pub harness_sys_s: f64,
    /// Other user processes (subtracted).
    pub others_s: f64,
}

/// The CPU spent from `a` to `b` ([`CpuSpent`]). Other processes count from
/// `a` (or from their start, if they started later) to `b` (or their last
/// reading, [`CpuSnapshot::with_watch`]); what one ran after its last
/// reading before it exited, or a process that started and ended between
/// two readings, is not seen and stays in the fair figure.
///
/// The machine's busy time is the elapsed time of every CPU less the idle,
/// iowait and steal counters, not the sum of the busy counters: with
/// `NO_HZ` the kernel keeps idle time exactly (`get_cpu_idle_time_us`), while
/// user, system and softirq are sampled by the tick and can read below the
/// exact run times (`sum_exec_runtime`) of the processes they hold, so
/// subtracting exact process times from the sampled sum would take off more
/// than it holds (perf/harness/README.md, "How CPU is counted", has the
/// measurement).
pub fn cpu_spent(a: &CpuSnapshot, b: &CpuSnapshot) -> CpuSpent {
    let tick = b.tick_s;
    let cpus_s = (b.mono_s - a.mono_s).max(0.0) * f64::from(b.cpus);
    let idle_s = b.host.not_running().saturating_sub(a.host.not_running()) as f64 * tick;
    let host_busy_s = (cpus_s - idle_s).max(0.0);
    let others_ticks: u64 = b
        .others
        .iter()
        .map(|(k, &t)| t.saturating_sub(a.others.get(k).copied().unwrap_or(0)))
        .sum();
    let others_s = others_ticks as f64 * tick;
    let harness_user_s = (b.own_user_s - a.own_user_s).max(0.0);
    let harness_sys_s = (b.own_sys_s - a.own_sys_s).max(0.0);
    let proc_s = (b.children_s - a.children_s).max(0.0);
    CpuSpent {
        // The contenders' own processes ran within the machine's busy time:
        // a remainder below their time is the subtraction overshooting (an
        // other process's exact time against the sampled busy time), not a
        // measure, so their time is the floor.
        fair_s: (host_busy_s - harness_user_s - others_s).max(proc_s),
        proc_s,
        host_busy_s,
        harness_user_s,
        harness_sys_s,
        others_s,
    }
}

/// Cumulative received bytes over time.
#[derive(Debug, Clone)]
pub struct Series {
    t0: Instant,
    /// (seconds since t0, cumulative bytes).
    pub points: Vec<(f64, u64)>,
}

impl Series {
    /// An empty series whose time zero is `t0` (the sender's start).
    pub fn new(t0: Instant) -> Series {
        Series {
            t0,
            points: vec![(0.0, 0)],
        }
    }

    /// Adds a progress report.
    pub fn push(&mut self, at: Instant, bytes: u64) {
        let t = at.saturating_duration_since(self.t0).as_secs_f64();
        self.points.push((t, bytes));
    }

    /// Cumulative bytes at `t` (linear between reports).
    pub fn bytes_at(&self, t: f64) -> f64 {
        let p = &self.points;
        match p.iter().position(|&(pt, _)| pt >= t) {
            None => p.last().map_or(0.0, |&(_, b)| b as f64),
            Some(0) => p[0].1 as f64,
            Some(i) => {
                let (t1, b1) = p[i - 1];
                let (t2, b2) = p[i];
                if t2 <= t1 {
                    return b2 as f64;
                }
                b1 as f64 + (b2 as f64 - b1 as f64) * (t - t1) / (t2 - t1)
            }
        }
    }

    /// The last report's time.
    pub fn end(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.0)
    }

    /// Goodput in Mbit/s per bin of `bin_s`: (bin end, Mbit/s).
    pub fn binned(&self, bin_s: f64) -> Vec<(f64, f64)> {
        let n = (self.end() / bin_s).ceil() as usize;
        (1..=n)
            .map(|i| {
                let (a, b) = ((i - 1) as f64 * bin_s, i as f64 * bin_s);
                (b, (self.bytes_at(b) - self.bytes_at(a)) * 8.0 / bin_s / 1e6)
            })
            .collect()
    }

    /// First `t ≥ from + window` at which the goodput over `[t − window, t]`
    /// reached `mbps`, on a 10 ms grid.
    pub fn first_reaching(&self, mbps: f64, window: f64, from: f64) -> Option<f64> {
        let mut t = from + window;
        while t <= self.end() + 1e-9 {
            let rate = (self.bytes_at(t) - self.bytes_at(t - window)) * 8.0 / window / 1e6;
            if rate >= mbps {
                return Some(t);
            }
            t += 0.01;
        }
        None
    }
}

/// Goodput in Mbit/s: `bytes` of payload over the time from `first_send_s`
/// (just before the sender handed its first payload byte to the transport)
/// to `last_s` (when the receiver had read the last byte, or when the run was
/// stopped). Every byte counted crossed the link inside that interval, in
/// order or not, so this cannot exceed the link's rate: the start-up and the
/// time the last data spent in the link count against the transport.
pub fn goodput_mbps(bytes: u64, first_send_s: f64, last_s: f64) -> f64 {
    bytes as f64 * 8.0 / (last_s - first_send_s).max(1e-6) / 1e6
}

/// Round trips the steady-state window must span at least.
pub const STEADY_MIN_RTTS: f64 = 8.0;

/// Steady-state goodput in Mbit/s of a finished transfer of `bytes` whose
/// last byte was read at `last_s`: from `(t_a, d_a)`, the first progress
/// report of `series` at least one round trip `rtt_s` after the first
/// delivery (start-up stays out), `(bytes − d_a)` over
/// `last_s − t_a + rtt_full_s`. None when `last_s − t_a` spans fewer than
/// [`STEADY_MIN_RTTS`] round trips.
///
/// Why the padding, and why it keeps the figure at or under the link's rate:
/// at `last_s` nothing is held back, but at `t_a` the receiver may hold data
/// behind a hole (arrived, not yet delivered to the application) that
/// crossed the link before `t_a`, and a plain slope over `[t_a, last_s]`
/// counts it against a window that did not carry it (a 10–90 % slope read
/// 116 % at 5 % loss). A hole is repaired within one round trip of when its
/// packet should have arrived (the next arrival shows the gap, the loss
/// report takes half a round trip to the sender, the retransmission the
/// other half, behind at most a full bottleneck queue: `rtt_full_s`). So
/// every byte delivered after `t_a` left the bottleneck no earlier than
/// `t_a − rtt_full_s − owd` and no later than `last_s − owd` (owd: the one
/// way delay after the bottleneck): at most `rate × (last_s − t_a +
/// rtt_full_s)` bytes. The bound takes each hole open at `t_a` to be
/// repaired by its first retransmission; one whose retransmission was lost
/// too holds data a further round trip, which can lift the figure by up to
/// that round trip's data over the window (at most 1/9 at the shortest
/// window, less on longer ones). The headline [`goodput_mbps`] takes nothing
/// on trust.
pub fn steady_mbps(
    series: &Series,
    bytes: u64,
    last_s: f64,
    rtt_s: f64,
    rtt_full_s: f64,
) -> Option<f64> {
    let first = series.points.iter().find(|p| p.1 > 0)?.0;
    let &(t_a, d_a) = series.points.iter().find(|p| p.0 >= first + rtt_s)?;
    let span = last_s - t_a;
    if span < STEADY_MIN_RTTS * rtt_s || bytes < d_a {
        return None;
    }
    Some((bytes - d_a) as f64 * 8.0 / (span + rtt_full_s) / 1e6)
}

/// The machine's load averages (1, 5, 15 minutes) from `/proc/loadavg`.
pub fn load_avg() -> Option<[f64; 3]> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The host's CPU time so far from `/proc/stat` (first line, clock ticks):
/// (steal, total of user, nice, system, idle, iowait, irq, softirq, steal).
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    cpu_ticks_of(s.lines().next()?)
}

/// [`cpu_ticks`] of a `/proc/stat` `cpu` line.
pub fn cpu_ticks_of(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = it.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    (v.len() == 8).then(|| (v[7], v.iter().sum()))
}

/// The share of CPU time stolen between two [`cpu_ticks`] readings.
pub fn steal_share(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1)?;
    let steal = after.0.checked_sub(before.0)?;
    (total > 0).then(|| steal as f64 / total as f64)
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th.
    pub p90_ms: f64,
    /// 99th.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Samples.
    pub samples: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of samples in microseconds; `None` if empty.
    pub fn of_us(samples: &[f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = |p: f64| {
            let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[i.clamp(1, v.len()) - 1] / 1e3
        };
        Some(Percentiles {
            p50_ms: rank(50.0),
            p90_ms: rank(90.0),
            p99_ms: rank(99.0),
            max_ms: v[v.len() - 1] / 1e3,
            samples: v.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_from_proc_stat() {
        let a = cpu_ticks_of("cpu  100 0 50 800 10 0 0 40 0 0").unwrap();
        assert_eq!(a, (40, 1000));
        let b = cpu_ticks_of("cpu  150 0 70 1000 10 0 0 100 0 0").unwrap();
        assert_eq!(steal_share(a, b), Some(60.0 / 330.0));
        assert_eq!(cpu_ticks_of("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(steal_share(a, a), None);
        // This host's own line parses.
        assert!(cpu_ticks().is_some());
    }
    use std::time::Duration;

    #[test]
    fn fair_cpu_is_the_machines_busy_time_less_the_harness_and_others() {
        let a = HostTicks::parse("cpu  100 5 50 800 10 2 3 40 0 0").unwrap();
        let busy = |h: HostTicks| h.user + h.nice + h.system + h.irq + h.softirq;
        assert_eq!((busy(a), a.not_running()), (160, 850));
        // 2.5 s later at 100 Hz on 2 CPUs: 500 ticks of CPU time, of which
        // the counters hold 412 (the tick's sampling misses some busy time),
        // 170 idle, iowait or stolen.
        let b = HostTicks::parse("cpu  250 5 120 930 20 4 23 70 0 0").unwrap();
        assert_eq!(
            (busy(b) - busy(a), b.not_running() - a.not_running()),
            (242, 170)
        );
        assert_eq!(HostTicks::parse("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(HostTicks::parse("cpu 1 2 3"), None);
        let snap = |host, mono_s, user, sys, children, others: &[((i32, u64), u64)]| CpuSnapshot {
            host,
            mono_s,
            cpus: 2,
            own_user_s: user,
            own_sys_s: sys,
            children_s: children,
            others: others.iter().copied().collect(),
            tick_s: 0.01,
        };
        // Process 10 ran 20 ticks; 11 started during the run (5 ticks); 12
        // exited (not seen at the end: stays in); 10's pid reused by a new
        // process counts from its start.
        let sa = snap(a, 100.0, 1.0, 2.0, 3.0, &[((10, 7), 100), ((12, 7), 50)]);
        let end = [((10, 7), 120), ((11, 90), 5), ((10, 95), 3)];
        let sb = snap(b, 102.5, 1.4, 2.5, 4.2, &end);
        let c = cpu_spent(&sa, &sb);
        let near = |x: f64, y: f64| (x - y).abs() < 1e-9;
        // 2 CPUs × 2.5 s − 1.7 s not running.
        assert!(near(c.host_busy_s, 3.3), "{c:?}");
        assert!(near(c.others_s, 0.28), "{c:?}");
        assert!(
            near(c.harness_user_s, 0.4) && near(c.harness_sys_s, 0.5),
            "{c:?}"
        );
        assert!(near(c.proc_s, 1.2), "{c:?}");
        // 3.3 busy − 0.4 harness user − 0.28 others; the harness's system
        // time (the emulator's calls, with the stack work inside) stays.
        assert!(near(c.fair_s, 2.62), "{c:?}");
        // Never below the contenders' own processes' time, whatever the
        // counters' rounding.
        let busy_other = snap(b, 102.5, 9.0, 2.5, 4.2, &[]);
        assert!(near(cpu_spent(&sa, &busy_other).fair_s, 1.2));
        // This machine's counters read.
        let now = CpuSnapshot::take().unwrap();
        assert!(
            busy(now.host) > 0 && now.tick_s > 0.0 && now.cpus >= 1,
            "{now:?}"
        );
    }

    #[test]
    fn the_watch_counts_a_process_that_exited() {
        let a = CpuSnapshot::take().unwrap();
        let w = OthersWatch::start();
        // Not in this process's tree: a busy loop in the background of a
        // shell that exits at once (the loop is reparented away), which
        // ends by itself well before the run's end reading.
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                "sh -c 'i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done' >/dev/null & echo $!",
            ])
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let gone = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(gone.elapsed() < Duration::from_secs(30), "{pid} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = w.finish();
        assert!(
            seen.1 >= 0.0 && seen.1 < 1.0,
            "the watch's own time {}",
            seen.1
        );
        let ticks = seen.0.iter().find(|(k, _)| k.0 == pid).map(|(_, &t)| t);
        assert!(ticks.is_some_and(|t| t > 0), "{pid}: {ticks:?}");
        let b = CpuSnapshot::take().unwrap().with_watch(seen);
        assert!(!b.others.is_empty());
        assert!(cpu_spent(&a, &b).others_s >= ticks.unwrap() as f64 * b.tick_s);
    }

    #[test]
    fn proc_stat_of_processes_and_their_tree() {
        // A name with spaces and parentheses; utime 7, stime 3, start 555,
        // flags 0x400100 (user) and 0x208040 (kernel thread).
        let line = |pid: i32, ppid: i32, flags: u64| {
            format!(
                "{pid} (a b) c) S {ppid} {pid} {pid} 0 -1 {flags} 1 2 3 4 7 3 0 0 20 0 1 0 555 \
                 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0"
            )
        };
        let p = ProcTicks::parse(&line(42, 7, 0x400100)).unwrap();
        assert_eq!((p.pid, p.ppid, p.start, p.ticks), (42, 7, 555, 10));
        assert!(!p.kernel_thread);
        assert!(
            ProcTicks::parse(&line(3, 2, 0x208040))
                .unwrap()
                .kernel_thread
        );
        // 100 is the harness; 101 its node, 102 the node's engine; 200 not
        // ours; 3 a kernel thread.
        let procs: Vec<ProcTicks> = [
            (1, 0, 0x400100),
            (100, 1, 0x400100),
            (101, 100, 0x400100),
            (102, 101, 0x400100),
            (200, 1, 0x400100),
            (3, 2, 0x208040),
        ]
        .iter()
        .map(|&(pid, ppid, f)| ProcTicks::parse(&line(pid, ppid, f)).unwrap())
        .collect();
        let mut o: Vec<i32> = others(&procs, 100).keys().map(|k| k.0).collect();
        o.sort();
        assert_eq!(o, vec![1, 200]);
        // This process is not among its own others; init is.
        let here = others(&all_procs(), std::process::id() as i32);
        assert!(!here.keys().any(|k| k.0 == std::process::id() as i32));
    }

    #[test]
    fn series_bins_and_threshold() {
        let t0 = Instant::now();
        let mut s = Series::new(t0);
        // 1 s at 0, then 12.5 MB/s (100 Mbit/s) for 3 s.
        for i in 1..=40 {
            let t = i as f64 * 0.1;
            let bytes = if t <= 1.0 {
                0
            } else {
                ((t - 1.0) * 12.5e6) as u64
            };
            s.push(t0 + Duration::from_secs_f64(t), bytes);
        }
        let b = s.binned(1.0);
        assert_eq!(b.len(), 4);
        assert!(b[0].1.abs() < 1e-6);
        assert!((b[2].1 - 100.0).abs() < 0.5, "{b:?}");
        let t90 = s.first_reaching(90.0, 1.0, 0.0).unwrap();
        assert!((t90 - 1.9).abs() < 0.02, "{t90}");
        assert!(s.first_reaching(200.0, 1.0, 0.0).is_none());
        assert!((s.bytes_at(2.05) - 1.05 * 12.5e6).abs() < 1.0);
    }

    /// A synthetic bulk transfer at the link's rate with holes: every
    /// `every`-th packet is lost and arrives again one round trip later, and
    /// the receiver delivers in order, so everything behind a hole comes out
    /// in one burst when it fills. Reports every 50 ms, as the nodes print
    /// them. Returns (delivered, bytes, last delivery).
    fn bursty(rate_mbps: f64, rtt_s: f64, secs: f64, every: u64) -> (Series, u64, f64) {
        const PKT: u64 = 1456;
        let per_s = rate_mbps * 1e6 / 8.0 / PKT as f64;
        let n = (secs * per_s) as u64;
        let owd = rtt_s / 2.0;
        // Packet i leaves the bottleneck at i / per_s and arrives owd later;
        // a lost one arrives one round trip after it should have.
        let mut deliver = Vec::with_capacity(n as usize);
        let mut m = 0.0f64;
        for i in 0..n {
            let t = i as f64 / per_s + owd;
            let a = if i % every == every / 2 { t + rtt_s } else { t };
            // In order: delivered at the latest arrival of 0..=i.
            m = m.max(a);
            deliver.push(m);
        }
        let t0 = Instant::now();
        let mut s = Series::new(t0);
        let last = *deliver.last().unwrap();
        let (mut t, mut k) = (0.05, 0usize);
        while t < last + 0.05 {
            while k < deliver.len() && deliver[k] <= t {
                k += 1;
            }
            s.push(t0 + Duration::from_secs_f64(t), k as u64 * PKT);
            t += 0.05;
        }
        (s, n * PKT, last)
    }

    /// The least-squares slope of delivered bytes between 10 % and 90 % of
    /// the total, Mbit/s: the measure these replace.
    fn slope_10_90(s: &Series, bytes: u64) -> f64 {
        let mid: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| (0.1 * bytes as f64..=0.9 * bytes as f64).contains(&(p.1 as f64)))
            .map(|&(t, b)| (t, b as f64))
            .collect();
        let n = mid.len() as f64;
        let (mt, mb) = mid
            .iter()
            .fold((0.0, 0.0), |(a, b), p| (a + p.0 / n, b + p.1 / n));
        let (c, v) = mid.iter().fold((0.0, 0.0), |(c, v), p| {
            (c + (p.0 - mt) * (p.1 - mb), v + (p.0 - mt) * (p.0 - mt))
        });
        c / v * 8.0 / 1e6
    }

    #[test]
    fn goodput_of_bursty_delivery_stays_under_the_link_rate() {
        let mut fooled = false;
        for (rtt, every) in [(0.6, 20), (0.6, 997), (0.6, 1 << 40), (0.2, 50), (0.04, 7)] {
            let (s, bytes, last) = bursty(100.0, rtt, 20.0, every);
            let g = goodput_mbps(bytes, 0.0, last);
            // No queue in the model: a repair takes one round trip.
            let st = steady_mbps(&s, bytes, last, rtt, rtt).unwrap();
            assert!(
                g <= 100.0 && st <= 100.0,
                "rtt {rtt}, every {every}: {g} {st}"
            );
            // Both still read most of the link: they are not bounded by
            // reading low.
            assert!(g > 90.0 && st > 90.0, "rtt {rtt}, every {every}: {g} {st}");
            fooled |= slope_10_90(&s, bytes) > 100.0;
        }
        assert!(fooled, "the bursts do not fool a receiver-side slope");
        // Too short a transfer for eight round trips: no steady figure.
        let (s, bytes, last) = bursty(100.0, 0.6, 4.0, 20);
        assert!(steady_mbps(&s, bytes, last, 0.6, 0.6).is_none());
    }

    #[test]
    fn load_avg_reads_proc() {
        let l = load_avg().unwrap();
        assert!(l.iter().all(|x| *x >= 0.0), "{l:?}");
    }

    #[test]
    fn percentiles_nearest_rank_in_ms() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64 * 1000.0).collect();
        let p = Percentiles::of_us(&v).unwrap();
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert!(Percentiles::of_us(&[]).is_none());
    }

    #[test]
    fn children_cpu_grows_with_a_busy_child() {
        let before = children_cpu_s();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        assert!(children_cpu_s() > before);
    }
}

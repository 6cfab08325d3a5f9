//! Logging: `tracing` events written to stderr in one of two shapes.
//!
//! - **Under systemd** (stderr is the journal stream named by `JOURNAL_STREAM`):
//!   one line per event, `<N>` first (the `sd-daemon(3)` priority prefix the
//!   journal turns into the entry's priority), no timestamp (the journal has
//!   its own), no colours.
//! - **Elsewhere**: a timestamp, the level, the thread (`lu2k-core0` …) and the
//!   message; colours when stderr is a terminal.
//!
//! The level is `--log-level` when given, else `RUST_LOG`, else `info`; either
//! takes a level (`error`, `warn`, `info`, `debug`, `trace`) or `tracing`
//! directives (`lu2k_engine::shard=debug,info`).
//!
//! What can repeat at packet rate is never logged per packet: it is counted (the
//! core's drops, `lu2k-engine stats`, `lu2k_core_drops_total`) and summarised at
//! most once per interval ([`log_every!`](crate::log_every) for a call site,
//! [`Limiter`] for a state machine's own, [`DropLog`] for a core's drops).

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Where log lines go, decided from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// stderr is the journal's stream: `<N>` prefixes, no timestamps.
    Journal,
    /// A terminal: timestamps and colours.
    Terminal,
    /// A file or pipe: timestamps, no colours.
    Plain,
}

impl Output {
    /// Journal when `JOURNAL_STREAM` names stderr's device and inode (systemd
    /// sets it for a service whose stderr is the journal; a child whose stderr
    /// was redirected inherits the variable but not the stream), else by
    /// whether stderr is a terminal.
    pub fn detect() -> Output {
        let stderr = std::io::stderr();
        if let Ok(v) = std::env::var("JOURNAL_STREAM") {
            if let (Some((dev, ino)), Ok(st)) = (parse_stream(&v), rustix::fs::fstat(&stderr)) {
                if st.st_dev == dev && st.st_ino == ino {
                    return Output::Journal;
                }
            }
        }
        if stderr.is_terminal() {
            Output::Terminal
        } else {
            Output::Plain
        }
    }
}

/// `JOURNAL_STREAM` is `DEVICE:INODE`, both decimal.
fn parse_stream(v: &str) -> Option<(u64, u64)> {
    let (d, i) = v.split_once(':')?;
    Some((d.trim().parse().ok()?, i.trim().parse().ok()?))
}

/// The filter: `--log-level`, else `RUST_LOG`, else `info`.
pub fn filter(level: Option<&str>) -> Result<EnvFilter, String> {
    let (spec, from) = match level {
        Some(l) => (l.to_string(), "--log-level"),
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
            _ => ("info".to_string(), "the default"),
        },
    };
    // A bare word is a level: EnvFilter would read a misspelt level as a target
    // name and quietly log nothing.
    let word = !spec.contains(['=', ',', '[', ':']);
    if word
        && spec
            .trim()
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
    {
        return Err(format!(
            "{from} {spec:?} is not a log level; use one of error, warn, info, debug, \
             trace, off, or directives like \"lu2k_engine::shard=debug,info\""
        ));
    }
    EnvFilter::try_new(&spec).map_err(|e| {
        format!(
            "{from} {spec:?} is not a log level or filter ({e}); use one of error, warn, \
             info, debug, trace, or directives like \"lu2k_engine::shard=debug,info\""
        )
    })
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(level: Option<&str>) -> Result<Output, String> {
    let filter = filter(level)?;
    let out = Output::detect();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match out {
        Output::Journal => b.with_ansi(false).event_format(Journal).try_init(),
        Output::Terminal | Output::Plain => b
            .with_target(false)
            .with_thread_names(true)
            .with_ansi(out == Output::Terminal)
            .try_init(),
    };
    r.map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(out)
}

/// The `sd-daemon(3)` priority of a level: err, warning, info, debug.
pub fn priority(l: Level) -> u8 {
    match l {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One journal line: `<N>message key=value…`.
#[derive(Debug, Clone, Copy)]
struct Journal;

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(w, "<{}>", priority(*event.metadata().level()))?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Lets a line through at most once per interval and counts what it held back.
///
/// ```
/// # use std::time::{Duration, Instant};
/// let mut l = lu2k_engine::log::Limiter::new(Duration::from_secs(10));
/// let t = Instant::now();
/// assert_eq!(l.hit(t), Some(0)); // the first line goes out
/// assert_eq!(l.hit(t), None); // held back, counted
/// assert_eq!(l.hit(t + Duration::from_secs(10)), Some(1)); // "… and 1 more"
/// ```
#[derive(Debug, Clone)]
pub struct Limiter {
    every: Duration,
    next: Option<Instant>,
    held: u64,
}

impl Limiter {
    /// A limiter of one line per `every`.
    pub fn new(every: Duration) -> Limiter {
        Limiter {
            every,
            next: None,
            held: 0,
        }
    }

    /// One occurrence at `now`: `Some(n)` when a line is due (`n` occurrences
    /// were held back since the last one), `None` when this one is held back.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|t| now < t) {
            self.held += 1;
            return None;
        }
        self.next = Some(now + self.every);
        Some(std::mem::take(&mut self.held))
    }
}

/// A per-call-site gate for [`log_every!`](crate::log_every): lets one line
/// through per interval, process-wide, and counts the ones it held back.
#[derive(Debug)]
pub struct Gate {
    /// Milliseconds since [`epoch`] before which lines are held back.
    next_ms: AtomicU64,
    held: AtomicU64,
}

/// The process's clock origin for [`Gate`]s.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Gate {
    /// An open gate.
    pub const fn new() -> Gate {
        Gate {
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// One occurrence: `Some(n)` when a line is due (`n` held back since the
    /// last), `None` when this one is held back.
    pub fn hit(&self, every: Duration) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now < next
            || self
                .next_ms
                .compare_exchange(
                    next,
                    now + every.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

/// Logs at most one line per interval from this call site (all threads
/// together), for conditions that can repeat at packet or loop rate; the line
/// carries `held` = how many were held back since the last one.
///
/// ```
/// use std::time::Duration;
/// for _ in 0..1000 {
///     lu2k_engine::log_every!(warn, Duration::from_secs(10), "bad packet from {}", "10.0.0.9");
/// }
/// ```
#[macro_export]
macro_rules! log_every {
    ($level:ident, $every:expr, $($arg:tt)+) => {{
        static GATE: $crate::log::Gate = $crate::log::Gate::new();
        if let Some(held) = GATE.hit($every) {
            ::tracing::$level!(held, $($arg)+);
        }
    }};
}

/// How often a core may log the drops it counted.
pub const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Turns a core's drop counters into at most one line per interval: the drops
/// since the last line, by reason. Fed with the counters whenever the core
/// publishes them; packets are never logged one by one.
#[derive(Debug, Clone)]
pub struct DropLog {
    limiter: Limiter,
    logged: BTreeMap<String, u64>,
    since: Option<Instant>,
}

impl DropLog {
    /// A drop log of one line per `every`.
    pub fn new(every: Duration) -> DropLog {
        DropLog {
            limiter: Limiter::new(every),
            logged: BTreeMap::new(),
            since: None,
        }
    }

    /// The line to log for `drops` (the core's counters) at `now`, if one is
    /// due and anything was dropped since the last.
    pub fn line(&mut self, now: Instant, drops: &BTreeMap<String, u64>) -> Option<String> {
        let since = *self.since.get_or_insert(now);
        let new: Vec<(&String, u64)> = drops
            .iter()
            .filter_map(|(k, &v)| {
                let d = v.saturating_sub(self.logged.get(k).copied().unwrap_or(0));
                (d > 0).then_some((k, d))
            })
            .collect();
        if new.is_empty() {
            return None;
        }
        self.limiter.hit(now)?;
        let total: u64 = new.iter().map(|(_, d)| d).sum();
        let by: Vec<String> = new.iter().map(|(k, d)| format!("{k} {d}")).collect();
        let secs = now.saturating_duration_since(since).as_secs_f64();
        self.logged = drops.clone();
        self.since = Some(now);
        Some(format!(
            "dropped {total} in {secs:.1} s: {} (counted in `lu2k-engine stats` and \
             lu2k_core_drops_total; at most one such line per {} s)",
            by.join(", "),
            self.limiter.every.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_parses() {
        assert_eq!(parse_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_stream("8"), None);
        assert_eq!(parse_stream("x:1"), None);
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    #[test]
    fn bad_level_names_the_choices() {
        let e = filter(Some("wran")).unwrap_err();
        assert!(e.contains("--log-level") && e.contains("debug"), "{e}");
        let e = filter(Some("lu2k_engine=loud")).unwrap_err();
        assert!(e.contains("not a log level or filter"), "{e}");
        assert!(filter(Some("debug")).is_ok());
        assert!(filter(Some("lu2k_engine::shard=debug,info")).is_ok());
    }

    /// A flood is one line per interval, carrying what it summarises.
    #[test]
    fn drop_log_bounds_the_lines() {
        let mut d = DropLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut drops = BTreeMap::new();
        let mut lines = Vec::new();
        // 100 s of floods, counters published every 100 ms.
        for i in 0..1000u64 {
            *drops.entry("rx_malformed".to_string()).or_insert(0) += 50;
            let now = t0 + Duration::from_millis(100 * i);
            lines.extend(d.line(now, &drops));
        }
        assert!((10..=11).contains(&lines.len()), "{} lines", lines.len());
        assert!(lines[0].starts_with("dropped 50 in 0.0 s: rx_malformed 50"));
        assert!(
            lines[1].starts_with("dropped 5000 in 10.0 s: rx_malformed 5000"),
            "{}",
            lines[1]
        );
        // Nothing new: nothing to say.
        let later = t0 + Duration::from_secs(500);
        assert!(d.line(later, &drops).is_some(), "the last interval's rest");
        assert!(d.line(later + Duration::from_secs(60), &drops).is_none());
    }
}

//! Link settings, as a scenario file states them.
//!
//! [`Config`] describes one direction of a link and [`DuplexConfig`] a pair of
//! directions. Both deserialize from TOML (or any serde format) with units in the
//! field names; every field has a default, and the default link is perfect (no
//! rate limit, no delay, no loss). [`Config::validate`] checks the ranges and
//! names the offending field in its error.
//!
//! ```
//! # let text = r#"
//! rate_mbps = 100.0        # bottleneck rate; omit for unlimited
//! queue_bytes = 1_500_000  # bottleneck buffer; omit for unlimited
//! overhead_bytes = 28      # added to every datagram's length on the wire (IP + UDP)
//! delay_ms = 300.0         # one-way propagation delay
//! jitter_ms = 5.0          # delay varies uniformly in delay ± jitter
//! reorder = false          # may jitter reorder datagrams?
//! duplicate = 0.001        # probability that a datagram is delivered twice
//! loss = { model = "gilbert_elliott", rate = 0.01, burst = 4.0 }
//! outages = [ { start_s = 30.0, end_s = 40.0 } ]
//! # "#;
//! # let c: lu2k_linkem::Config = toml::from_str(text).unwrap();
//! # c.validate().unwrap();
//! # assert_eq!(c.outages[0].end_s, 40.0);
//! ```
//!
//! Other loss models: `loss = { model = "none" }` (the default) and
//! `loss = { model = "bernoulli", rate = 0.01 }`. A [`DuplexConfig`] is two
//! such tables, `[forward]` and `[reverse]`; a scenario file embeds it under
//! any table name, for example `[link.forward]` and `[link.reverse]`.

use serde::{Deserialize, Serialize};

/// Settings of one link direction. See the [module docs](self) for the TOML form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Bottleneck rate in Mbit/s (10^6 bit/s); `None` means unlimited (no
    /// serialization delay, no queue).
    pub rate_mbps: Option<f64>,
    /// Bottleneck buffer in bytes, counting the datagram being transmitted;
    /// an arriving datagram that does not fit is tail-dropped. `None` means
    /// unlimited. Ignored without a rate.
    pub queue_bytes: Option<u64>,
    /// Bytes added to each datagram's length for serialization and queueing
    /// (for example 28 for the IPv4 and UDP headers a UDP relay does not see).
    pub overhead_bytes: u32,
    /// One-way propagation delay in milliseconds.
    pub delay_ms: f64,
    /// Jitter in milliseconds: each datagram's propagation delay is drawn
    /// uniformly from `[delay_ms - jitter_ms, delay_ms + jitter_ms]`. Must not
    /// exceed `delay_ms`.
    pub jitter_ms: f64,
    /// Whether jitter may reorder datagrams. When `false`, a datagram is never
    /// delivered before one that entered the link earlier: its delivery time is
    /// raised to the previous one's.
    pub reorder: bool,
    /// Random loss on the wire, after the queue.
    pub loss: Loss,
    /// Probability in `[0, 1]` that a delivered datagram is delivered twice.
    pub duplicate: f64,
    /// Scheduled outages, in seconds since the epoch of the caller's clock.
    pub outages: Vec<Outage>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate_mbps: None,
            queue_bytes: None,
            overhead_bytes: 0,
            delay_ms: 0.0,
            jitter_ms: 0.0,
            reorder: false,
            loss: Loss::None,
            duplicate: 0.0,
            outages: Vec::new(),
        }
    }
}

/// Random loss models. TOML: `loss = { model = "bernoulli", rate = 0.01 }`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum Loss {
    /// No random loss.
    #[default]
    None,
    /// Each datagram is lost independently with probability `rate` in `[0, 1)`.
    Bernoulli {
        /// Loss probability.
        rate: f64,
    },
    /// Bursty loss: a two-state Markov chain (the simple Gilbert model: every
    /// datagram sent in the bad state is lost, none in the good state), stepped
    /// once per datagram put on the wire. It is parametrised by what one
    /// measures: the long-run loss fraction `rate` in `[0, 1)` and the mean
    /// length `burst` ≥ 1 of a run of consecutive losses. The chain leaves the
    /// bad state with probability `r = 1 / burst` and enters it with
    /// probability `p = r · rate / (1 − rate)`, which must not exceed 1.
    GilbertElliott {
        /// Long-run loss fraction.
        rate: f64,
        /// Mean number of consecutive losses.
        burst: f64,
    },
}

impl Loss {
    /// The long-run fraction of datagrams on the wire that this model loses.
    pub fn mean_rate(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Bernoulli { rate } | Loss::GilbertElliott { rate, .. } => rate,
        }
    }
}

/// A scheduled outage `[start_s, end_s)`, in seconds since the epoch: a datagram
/// whose transmission would start inside it is dropped. Datagrams already
/// propagating when it starts are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Start, inclusive, in seconds.
    pub start_s: f64,
    /// End, exclusive, in seconds.
    pub end_s: f64,
}

/// A configuration value out of range: the field (a path like `loss.rate` or
/// `forward.outages[1].end_s`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("link setting `{field}`: {problem}")]
pub struct ConfigError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub problem: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error with `prefix.` in front of the field path.
    pub(crate) fn prefixed(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

fn check_prob(field: &str, v: f64, max_inclusive: bool) -> Result<(), ConfigError> {
    let ok = v.is_finite() && v >= 0.0 && if max_inclusive { v <= 1.0 } else { v < 1.0 };
    if ok {
        Ok(())
    } else {
        let range = if max_inclusive { "[0, 1]" } else { "[0, 1)" };
        Err(ConfigError::new(
            field,
            format!("must be a probability in {range}, got {v}"),
        ))
    }
}

/// Largest time setting accepted, in seconds (a day): keeps nanosecond
/// arithmetic far from overflow.
const MAX_SECONDS: f64 = 86_400.0;

fn check_ms(field: &str, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && (0.0..=MAX_SECONDS * 1e3).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("must be a number of milliseconds in [0, 86400000], got {v}"),
        ))
    }
}

impl Config {
    /// Checks every field; the error names the first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(rate) = self.rate_mbps {
            // 1 kbit/s .. 10 Tbit/s.
            if !(rate.is_finite() && (1e-3..=1e7).contains(&rate)) {
                return Err(ConfigError::new(
                    "rate_mbps",
                    format!(
                        "must be in [0.001, 10000000] Mbit/s, or omitted for unlimited, got {rate}"
                    ),
                ));
            }
        }
        if self.queue_bytes == Some(0) {
            return Err(ConfigError::new(
                "queue_bytes",
                "must be at least one byte, or omitted for unlimited",
            ));
        }
        check_ms("delay_ms", self.delay_ms)?;
        check_ms("jitter_ms", self.jitter_ms)?;
        if self.jitter_ms > self.delay_ms {
            return Err(ConfigError::new(
                "jitter_ms",
                format!(
                    "must not exceed delay_ms ({}), got {}",
                    self.delay_ms, self.jitter_ms
                ),
            ));
        }
        match self.loss {
            Loss::None => {}
            Loss::Bernoulli { rate } => check_prob("loss.rate", rate, false)?,
            Loss::GilbertElliott { rate, burst } => {
                check_prob("loss.rate", rate, false)?;
                if !(burst.is_finite() && burst >= 1.0) {
                    return Err(ConfigError::new(
                        "loss.burst",
                        format!("must be a mean burst length >= 1, got {burst}"),
                    ));
                }
                let p = rate / (1.0 - rate) / burst;
                if p > 1.0 {
                    return Err(ConfigError::new(
                        "loss.burst",
                        format!(
                            "too short for loss rate {rate}: needs burst >= {} (rate / (1 - rate))",
                            rate / (1.0 - rate)
                        ),
                    ));
                }
            }
        }
        check_prob("duplicate", self.duplicate, true)?;
        for (i, o) in self.outages.iter().enumerate() {
            let ok = |v: f64| v.is_finite() && (0.0..=MAX_SECONDS).contains(&v);
            if !ok(o.start_s) {
                return Err(ConfigError::new(
                    format!("outages[{i}].start_s"),
                    format!("must be seconds in [0, 86400], got {}", o.start_s),
                ));
            }
            if !ok(o.end_s) || o.end_s <= o.start_s {
                return Err(ConfigError::new(
                    format!("outages[{i}].end_s"),
                    format!(
                        "must be seconds in [0, 86400] after start_s ({}), got {}",
                        o.start_s, o.end_s
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Settings of both directions of a link, which may differ (a narrow return
/// path is normal on satellites). TOML: tables `[forward]` and `[reverse]`;
/// either may be omitted for a perfect direction.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DuplexConfig {
    /// Side A to side B.
    pub forward: Config,
    /// Side B to side A.
    pub reverse: Config,
}

impl DuplexConfig {
    /// The same settings in both directions.
    pub fn symmetric(config: Config) -> Self {
        DuplexConfig {
            forward: config.clone(),
            reverse: config,
        }
    }

    /// Checks both directions; the error's field starts with `forward.` or `reverse.`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.forward.validate().map_err(|e| e.prefixed("forward"))?;
        self.reverse.validate().map_err(|e| e.prefixed("reverse"))
    }
}

//! Helpers shared by the emulator self-tests: a paced sender and a
//! timestamping receiver, real-time scheduling, and reporting.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lu2k_linkem::{set_realtime, RelayStats};

static SERIAL: Mutex<()> = Mutex::new(());

/// Timing tests run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One received datagram: sequence number, send and receive instants in ns
/// since the emulator's epoch, length.
#[derive(Debug, Clone, Copy)]
pub struct Rx {
    pub seq: u64,
    pub sent: u64,
    pub recv: u64,
    pub len: usize,
}

pub enum Pacing {
    /// One datagram, then at least `gap` until the next (never catching up,
    /// so the sender itself never bursts).
    Smooth(Duration),
    /// Bursts every millisecond, averaging `per_ms` datagrams per millisecond.
    Batched(f64),
}

pub fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// True, or false after saying loudly why the test skips.
pub fn realtime_or_skip(realtime: bool, test: &str) -> bool {
    if !realtime {
        skip(
            test,
            "real-time scheduling (SCHED_FIFO) not permitted here (needs root or CAP_SYS_NICE); \
             without it timing on a loaded machine is off by milliseconds",
        );
    }
    realtime
}

/// Says why a test skips, on stderr directly: libtest captures `eprintln!`
/// of passing tests, and a skip must be seen.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}

/// Sleeps (timer slack 1 ns) until shortly before `t`, then spins.
pub fn wait_until(epoch: Instant, t: u64) {
    loop {
        let now = now_ns(epoch);
        if now >= t {
            return;
        }
        let left = t - now;
        if left > 60_000 {
            std::thread::sleep(Duration::from_nanos(left - 40_000));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends `n` datagrams of `len` bytes from side A, starting at `start` ns
/// after the epoch; returns the send instant of each and what side B received.
pub fn transfer(
    epoch: Instant,
    a: &UdpSocket,
    b: UdpSocket,
    n: u64,
    len: usize,
    start: u64,
    pacing: Pacing,
) -> (Vec<u64>, Vec<Rx>) {
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    // Below the receiver and the emulator (40), so its spinning never holds them up.
    let _ = set_realtime(20);
    let done = Arc::new(AtomicBool::new(false));
    let rx = {
        let done = done.clone();
        std::thread::spawn(move || {
            let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
            let _ = set_realtime(30);
            b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = vec![0u8; 65_536];
            let mut got = Vec::new();
            let mut quiet = 0;
            loop {
                match b.recv(&mut buf) {
                    Ok(l) => {
                        let recv = epoch.elapsed().as_nanos() as u64;
                        let seq = u64::from_le_bytes(buf[0..8].try_into().unwrap());
                        let sent = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                        got.push(Rx {
                            seq,
                            sent,
                            recv,
                            len: l,
                        });
                        quiet = 0;
                    }
                    Err(_) => {
                        if done.load(Ordering::Relaxed) {
                            quiet += 1;
                            // Silence for 0.5 s after the sender finished.
                            if quiet >= 10 {
                                return got;
                            }
                        }
                    }
                }
            }
        })
    };
    let mut payload = vec![0u8; len];
    let mut stamps = Vec::with_capacity(n as usize);
    let mut send = |seq: u64, payload: &mut [u8]| {
        let sent = now_ns(epoch);
        payload[0..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&sent.to_le_bytes());
        a.send(payload).unwrap();
        stamps.push(sent);
    };
    wait_until(epoch, start);
    match pacing {
        Pacing::Smooth(gap) => {
            let gap = gap.as_nanos() as u64;
            for seq in 0..n {
                send(seq, &mut payload);
                wait_until(epoch, now_ns(epoch) + gap);
            }
        }
        Pacing::Batched(per_ms) => {
            let mut seq = 0;
            let mut ms = 0u64;
            while seq < n {
                ms += 1;
                let due = ((ms as f64 * per_ms) as u64).min(n);
                while seq < due {
                    send(seq, &mut payload);
                    seq += 1;
                }
                wait_until(epoch, start + ms * 1_000_000);
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    let got = rx.join().unwrap();
    // Back to normal scheduling for whatever runs next on this thread.
    let _ = rustix::thread::set_current_timer_slack(None);
    (stamps, got)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn report(name: &str, s: &RelayStats) {
    eprintln!(
        "{name}: emulator sent {} late mean {:?} max {:?}, unroutable {}, send errors {}",
        s.sent,
        s.late_total / (s.sent.max(1) as u32),
        s.late_max,
        s.unroutable,
        s.send_errors
    );
}

/// Echoes every datagram arriving on `b` until the returned flag is set.
pub fn echo(b: UdpSocket) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
        let _ = set_realtime(30);
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = b.recv_from(&mut buf) {
                b.send_to(&buf[..n], from).unwrap();
            }
        }
    });
    (stop, t)
}

/// `count` round trips of `len`-byte datagrams from the connected socket `a`
/// to an echo, one after another; the round-trip times in ms.
pub fn ping(a: &UdpSocket, count: u8, len: usize) -> Vec<f64> {
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
    let _ = set_realtime(20);
    a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rtts = Vec::new();
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let t = Instant::now();
        a.send(&vec![i; len]).unwrap();
        let n = a.recv(&mut buf).unwrap();
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(&buf[..n], &vec![i; len][..], "echo of ping {i}");
    }
    rtts
}

/// Runs a timing measurement up to three times and fails only if every run
/// misses its bound.
///
/// The relay and the test threads run under real-time scheduling, but on a
/// shared 2-core VM the host itself can stall them for milliseconds (the
/// relay's own `late max` shows it). A model or relay error repeats on every
/// run; a host stall does not. Correctness checks (nothing early, nothing
/// lost) stay plain assertions inside the runs.
pub fn within_attempts(test: &str, mut run: impl FnMut() -> Result<(), String>) {
    let mut misses = Vec::new();
    for attempt in 1..=3 {
        match run() {
            Ok(()) => return,
            Err(why) => {
                eprintln!("{test}: attempt {attempt} missed: {why}");
                misses.push(why);
            }
        }
    }
    panic!("{test}: every attempt missed its bound: {misses:?}");
}

//! Cross-process stress test: two processes share a memfd region. The parent plays
//! kshim and sends 10 million TX descriptors; the child (this test binary re-executed
//! with `--ignored --exact stress_child`) plays the engine, checks that every descriptor
//! arrives exactly once and in order with the right contents (and, for every 64th, the
//! right payload bytes through validation), and answers each with a completion, which
//! the parent checks the same way.
//!
//! Sleeping and waking are exercised on both sides: the parent pauses now and then, so
//! the child empties its ring, spins briefly and goes to sleep (alternating eventfd and
//! futex waits); the parent sleeps on the completion doorbell when it cannot send. In
//! lock-step phases the parent sends a burst and waits for all of it to complete, so
//! each side's single notify per burst is the only way the other wakes up.
//! Every sleep has a 10 s timeout: a timeout with work pending is a lost wakeup and fails
//! the test. Both sides report how often they slept; the test requires that they did.
#![cfg(not(loom))]
// One unsafe block: taking ownership of the inherited fds in the child (see there).
#![allow(unsafe_code)]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lu2k_ring_abi::{
    Config, Eventfds, Extent, ExtentBuf, LndType, Net, Nid, Pool, Region, TxCompletion, TxDesc,
    TxStatus, WaitMode, Wake,
};

const TOTAL: u64 = 10_000_000;
const INFLIGHT: u64 = 4096;
const PAYLOAD_EVERY: u64 = 64;
const PAYLOAD_SLOTS: u64 = INFLIGHT / PAYLOAD_EVERY;
const PAYLOAD_LEN: u32 = 200;
const SLOT_BYTES: u64 = 256;
const SLEEP_TIMEOUT: Duration = Duration::from_secs(10);
const LOCK_STEP_LEN: u64 = 20_000;
const ENV: &str = "LU2K_STRESS_CHILD_FDS";

fn cfg() -> Config {
    Config {
        cores: 1,
        tx_entries: 1024,
        tx_done_entries: INFLIGHT as u32,
        rx_entries: 2,
        rx_return_entries: 2,
        tx_pool_len: PAYLOAD_SLOTS * SLOT_BYTES,
        rx_buf_size: 64,
        rx_buf_count: 1,
        rx_tables_per_core: 0,
        // Wrap the indices early in the run.
        start_index: u32::MAX - 10_000,
        ..Config::default()
    }
}

/// What descriptor `i` carries; both sides compute it.
fn expected(i: u64) -> TxDesc {
    let mut hdr = [0u8; 72];
    for (j, b) in hdr.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(j as u8);
    }
    // NID4s and IPv6 NIDs alternate, so both forms cross the ring.
    let bits = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let nid = if i % 2 == 0 {
        Nid::from_nid4(bits)
    } else {
        let ip = std::net::Ipv6Addr::from((u128::from(bits) << 64) | u128::from(i) | 1 << 127);
        Nid::from_net_ipv6(Net::new(LndType::LU2K, i as u16), ip)
    };
    if i % PAYLOAD_EVERY == 0 {
        let slot = (i / PAYLOAD_EVERY) % PAYLOAD_SLOTS;
        TxDesc::inline(
            i,
            nid,
            hdr,
            &[Extent::new(Pool::Tx, slot * SLOT_BYTES, PAYLOAD_LEN)],
        )
    } else {
        TxDesc::inline(i, nid, hdr, &[])
    }
}

fn payload(i: u64) -> Vec<u8> {
    (0..PAYLOAD_LEN).map(|j| (i as u32 ^ j) as u8).collect()
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn busy(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn inheritable(fd: &OwnedFd) -> OwnedFd {
    let dup = fd.try_clone().unwrap();
    rustix::io::fcntl_setfd(&dup, rustix::io::FdFlags::empty()).unwrap();
    dup
}

#[test]
fn cross_process_stress() {
    let region = Region::create(&cfg()).unwrap();
    let fds = Eventfds::new().unwrap();
    let child_mem = inheritable(&region.fd().try_clone_to_owned().unwrap());
    let child_to_engine = inheritable(fds.to_engine.as_ref().unwrap());
    let child_to_kshim = inheritable(fds.to_kshim.as_ref().unwrap());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stress_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            ENV,
            format!(
                "{},{},{}",
                child_mem.as_raw_fd(),
                child_to_engine.as_raw_fd(),
                child_to_kshim.as_raw_fd()
            ),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    drop((child_mem, child_to_engine, child_to_kshim));

    let started = Instant::now();
    let mut k = region.kshim_core(0, fds).unwrap();
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    let mut next_send = 0u64;
    let mut next_done = 0u64;
    let mut next_pause = 50_000u64;
    let mut done_buf = [TxCompletion::default(); 256];
    let mut sleeps = 0u64;
    let mut lock_step_until = 0u64;
    let mut lock_step_phases = 0u64;
    let mut batch = Vec::with_capacity(64);

    while next_done < TOTAL {
        // Drain completions: exactly once, in order, status Ok.
        let n = k.tx_done.pop_slice(&mut done_buf).unwrap();
        for c in &done_buf[..n] {
            assert_eq!(c.cookie, next_done, "completion out of order or duplicated");
            assert_eq!(c.status(), Ok(TxStatus::Ok));
            next_done += 1;
        }

        // Send a batch of random size within the in-flight window. In a lock-step phase,
        // send only when everything sent has completed, so every burst's one notify is
        // the only wakeup the child gets (and every completion batch the parent's).
        let lock_step = next_send < lock_step_until;
        let window = if lock_step && next_send != next_done {
            0
        } else {
            INFLIGHT
        };
        let room = window
            .saturating_sub(next_send - next_done)
            .min(TOTAL - next_send);
        let want = (rng.next() % 64 + 1).min(room);
        batch.clear();
        for i in next_send..next_send + want {
            if i % PAYLOAD_EVERY == 0 {
                let slot = (i / PAYLOAD_EVERY) % PAYLOAD_SLOTS;
                region
                    .write_pool(Pool::Tx, slot * SLOT_BYTES, &payload(i))
                    .unwrap();
            }
            batch.push(expected(i));
        }
        let sent = k.tx.push_slice(&batch).unwrap() as u64;
        if sent > 0 {
            next_send += sent;
            k.to_engine.notify().unwrap();
        }

        // Now and then stop producing for a moment so the child falls asleep, or start
        // a lock-step phase of request/response bursts.
        if next_send >= next_pause {
            next_pause += 20_000 + rng.next() % 180_000;
            if rng.next() % 2 == 0 {
                std::thread::sleep(Duration::from_micros(300));
            } else {
                lock_step_until = next_send + LOCK_STEP_LEN;
                lock_step_phases += 1;
            }
        }

        if n == 0 && sent == 0 && next_done < TOTAL {
            // Nothing to do: sleep until the child completes something (after a moment of
            // other work, as in the child).
            busy(Duration::from_nanos(rng.next() % 5_000));
            let w = k
                .wait
                .wait(WaitMode::Eventfd, Some(SLEEP_TIMEOUT), || {
                    !k.tx_done.is_empty().unwrap()
                })
                .unwrap();
            if w != Wake::Work {
                sleeps += 1;
            }
            if w == Wake::TimedOut {
                let pending = !k.tx_done.is_empty().unwrap();
                let status = child.try_wait().unwrap();
                panic!("parent slept {SLEEP_TIMEOUT:?}: completions pending {pending} (lost wakeup if true), child {status:?}");
            }
        }
    }
    let elapsed = started.elapsed();
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "child failed: {status:?}\n{out}");
    let stats = out
        .lines()
        .find_map(|l| l.split_once("STRESS-CHILD ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("child printed no stats:\n{out}"));
    let field = |name: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap()
    };
    eprintln!(
        "stress: {TOTAL} descriptors + completions in {elapsed:?} ({:.1} M/s); parent slept {sleeps} ({lock_step_phases} lock-step phases); child {stats}",
        TOTAL as f64 / elapsed.as_secs_f64() / 1e6
    );
    assert_eq!(field("received"), TOTAL);
    assert_eq!(field("payloads"), TOTAL / PAYLOAD_EVERY);
    // Sleeping and waking were exercised, with both kinds of doorbell.
    assert!(
        field("eventfd_sleeps") >= 10,
        "child rarely slept on the eventfd: {stats}"
    );
    assert!(
        field("futex_sleeps") >= 10,
        "child rarely slept on the futex: {stats}"
    );
}

#[test]
#[ignore = "child half of cross_process_stress, which runs it with --ignored --exact"]
fn stress_child() {
    let Ok(spec) = std::env::var(ENV) else {
        eprintln!("stress_child: {ENV} not set; this is run by cross_process_stress only");
        return;
    };
    let owned: Vec<OwnedFd> = spec
        .split(',')
        .map(|s| {
            let fd: i32 = s.parse().unwrap();
            // SAFETY: the parent passed these descriptor numbers, which it made
            // inheritable for this child only; nothing else in this process owns them.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    let Ok([mem, to_engine, to_kshim]) = <[OwnedFd; 3]>::try_from(owned) else {
        panic!("bad {ENV}: {spec}");
    };
    let region = Region::from_fd(mem).unwrap();
    let mut e = region
        .engine_core(
            0,
            Eventfds {
                to_engine: Some(to_engine),
                to_kshim: Some(to_kshim),
            },
        )
        .unwrap();
    let mut scratch = ExtentBuf::new();
    let (mut received, mut payloads) = (0u64, 0u64);
    let (mut eventfd_sleeps, mut futex_sleeps, mut rechecks) = (0u64, 0u64, 0u64);
    let mut idle_spins = 0u64;
    let mut spin_limit = 0u64;
    let mut rng = XorShift(0xDEAD_BEEF_F00D_CAFE);
    let mut futex_next = false;

    while received < TOTAL {
        let n = e.tx.peek(64).unwrap();
        if n == 0 {
            idle_spins += 1;
            if idle_spins < spin_limit {
                std::hint::spin_loop();
                continue;
            }
            // Random spin lengths move the moment of arming around the producer's
            // publication, which is where a protocol without the re-check loses wakeups.
            idle_spins = 0;
            spin_limit = rng.next() % 100;
            let mode = if futex_next {
                WaitMode::Futex
            } else {
                WaitMode::Eventfd
            };
            futex_next = !futex_next;
            let w = e
                .wait
                .wait(mode, Some(SLEEP_TIMEOUT), || !e.tx.is_empty().unwrap())
                .unwrap();
            match (w, mode) {
                (Wake::Work, _) => rechecks += 1,
                (Wake::Woken, WaitMode::Eventfd) => eventfd_sleeps += 1,
                (Wake::Woken, WaitMode::Futex) => futex_sleeps += 1,
                (Wake::TimedOut, _) => panic!(
                    "child slept {SLEEP_TIMEOUT:?} with {} descriptors pending (lost wakeup if > 0) after {received}",
                    e.tx.refresh().unwrap()
                ),
            }
            continue;
        }
        idle_spins = 0;
        let mut done = [TxCompletion::default(); 64];
        for j in 0..n {
            let d = e.tx.read(j);
            let want = expected(received);
            assert_eq!(
                d, want,
                "descriptor {received} wrong, duplicated or out of order"
            );
            let v = region.validate_tx(&d, &mut scratch).unwrap();
            if let Some(ext) = v.extents.first() {
                assert_eq!(region.pool_bytes(ext).unwrap(), &payload(received)[..]);
                payloads += 1;
            }
            done[j as usize] = TxCompletion::new(d.cookie, TxStatus::Ok, 0);
            received += 1;
        }
        e.tx.release(n);
        // The completion ring holds the whole in-flight window, so this never fills.
        assert_eq!(
            e.tx_done.push_slice(&done[..n as usize]).unwrap(),
            n as usize
        );
        e.to_kshim.notify().unwrap();
    }
    println!(
        "STRESS-CHILD received={received} payloads={payloads} eventfd_sleeps={eventfd_sleeps} futex_sleeps={futex_sleeps} rechecks={rechecks}"
    );
}

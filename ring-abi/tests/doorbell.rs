//! The doorbell protocol between threads of one process: no ring while the consumer is
//! awake, a sleeping consumer is woken by eventfd and by futex, the re-check after arming
//! prevents a sleep, timeouts, and the need-wakeup word is cleared after every wait.
#![cfg(not(loom))]

use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant};

use lu2k_ring_abi::doorbell::WaitError;
use lu2k_ring_abi::{Config, Eventfds, Region, RxReturn, WaitMode, Wake};

fn region() -> Region {
    Region::create(&Config {
        tx_entries: 16,
        tx_done_entries: 16,
        rx_entries: 16,
        rx_return_entries: 16,
        tx_pool_len: 4096,
        rx_buf_size: 64,
        rx_buf_count: 1,
        rx_tables_per_core: 0,
        ..Config::default()
    })
    .unwrap()
}

fn eventfd_count(fd: impl AsFd) -> u64 {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(_) => u64::from_ne_bytes(b),
        Err(rustix::io::Errno::AGAIN) => 0,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn an_awake_consumer_costs_the_producer_no_syscall() {
    let r = region();
    let fds = Eventfds::new().unwrap();
    let probe = fds.try_clone().unwrap();
    let mut k = r.kshim_core(0, fds).unwrap();
    assert!(k.rx_return.push(RxReturn { token: 1 }).unwrap());
    assert!(!k.to_engine.notify().unwrap(), "nobody asked for a wakeup");
    assert_eq!(eventfd_count(probe.to_engine.as_ref().unwrap()), 0);
}

fn woken_across_threads(mode: WaitMode) {
    let r = region();
    let fds = Eventfds::new().unwrap();
    let mut k = r.kshim_core(0, fds.try_clone().unwrap()).unwrap();
    let mut e = r.engine_core(0, fds).unwrap();
    let producer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        assert!(k.rx_return.push(RxReturn { token: 7 }).unwrap());
        let rang = k.to_engine.notify().unwrap();
        (k, rang)
    });
    let t0 = Instant::now();
    let w = e
        .wait
        .wait(mode, Some(Duration::from_secs(10)), || {
            !e.rx_return.is_empty().unwrap()
        })
        .unwrap();
    let (k, rang) = producer.join().unwrap();
    assert_eq!(w, Wake::Woken, "{mode:?}");
    assert!(rang, "the producer saw the need-wakeup bit");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(e.rx_return.pop().unwrap(), Some(RxReturn { token: 7 }));
    // The consumer cleared its bit on waking: the next notify does not ring.
    assert!(!k.to_engine.notify().unwrap());
}

#[test]
fn a_sleeping_consumer_is_woken_by_eventfd() {
    woken_across_threads(WaitMode::Eventfd);
}

#[test]
fn a_sleeping_consumer_is_woken_by_futex() {
    woken_across_threads(WaitMode::Futex);
}

#[test]
fn the_recheck_after_arming_prevents_the_sleep() {
    let r = region();
    let mut k = r.kshim_core(0, Eventfds::none()).unwrap();
    let mut e = r.engine_core(0, Eventfds::none()).unwrap();
    assert!(k
        .tx
        .push(lu2k_ring_abi::TxDesc::inline(
            1,
            lu2k_ring_abi::Nid::from_nid4(2),
            [0; 72],
            &[]
        ))
        .unwrap());
    // Without a timeout: if the re-check did not happen this would block forever.
    let w = e
        .wait
        .wait(WaitMode::Futex, None, || !e.tx.is_empty().unwrap())
        .unwrap();
    assert_eq!(w, Wake::Work);
    assert!(
        !k.to_engine.notify().unwrap(),
        "bit cleared after a wait that found work"
    );
}

#[test]
fn waits_time_out_and_report_it() {
    let r = region();
    let fds = Eventfds::new().unwrap();
    let e = r.engine_core(0, fds).unwrap();
    for mode in [WaitMode::Eventfd, WaitMode::Futex] {
        let w = e
            .wait
            .wait(mode, Some(Duration::from_millis(20)), || false)
            .unwrap();
        assert_eq!(w, Wake::TimedOut, "{mode:?}");
    }
    let e2 = region().engine_core(0, Eventfds::none()).unwrap();
    assert_eq!(
        e2.wait.wait(WaitMode::Eventfd, None, || false).unwrap_err(),
        WaitError::NoEventfd
    );
}

#[test]
fn a_ring_while_awake_is_kept_and_costs_at_most_one_spurious_wake() {
    let r = region();
    let fds = Eventfds::new().unwrap();
    let mut k = r.kshim_core(0, fds.try_clone().unwrap()).unwrap();
    let mut e = r.engine_core(0, fds).unwrap();
    // The consumer arms, finds work in the re-check... but the producer rang in between
    // (simulated: it rings while the bit is set, before the consumer clears it).
    let w = e
        .wait
        .wait(WaitMode::Eventfd, None, || {
            assert!(k.rx_return.push(RxReturn { token: 1 }).unwrap());
            assert!(k.to_engine.notify().unwrap(), "bit is set while armed");
            true
        })
        .unwrap();
    assert_eq!(w, Wake::Work);
    assert_eq!(e.rx_return.pop().unwrap(), Some(RxReturn { token: 1 }));
    // The stale count makes the next sleep return at once (spurious, harmless)...
    let w = e
        .wait
        .wait(WaitMode::Eventfd, Some(Duration::from_secs(5)), || false)
        .unwrap();
    assert_eq!(w, Wake::Woken);
    // ...and after that a sleep really sleeps.
    let w = e
        .wait
        .wait(WaitMode::Eventfd, Some(Duration::from_millis(20)), || false)
        .unwrap();
    assert_eq!(w, Wake::TimedOut);
}

#[test]
fn an_event_loop_can_arm_and_sleep_on_the_eventfd_itself() {
    let r = region();
    let fds = Eventfds::new().unwrap();
    let mut k = r.kshim_core(0, fds.try_clone().unwrap()).unwrap();
    let mut e = r.engine_core(0, fds).unwrap();
    // The engine arms, re-checks (empty), and "submits a read" of its eventfd.
    e.wait.arm(lu2k_ring_abi::doorbell::WAKE_EVENTFD);
    assert!(e.rx_return.is_empty().unwrap());
    let efd = e.wait.eventfd().unwrap().try_clone_to_owned().unwrap();
    assert_eq!(eventfd_count(&efd), 0);
    // kshim publishes and rings; the eventfd becomes readable.
    assert!(k.rx_return.push(RxReturn { token: 3 }).unwrap());
    assert!(k.to_engine.notify().unwrap());
    assert_eq!(eventfd_count(&efd), 1);
    e.wait.disarm();
    assert_eq!(e.rx_return.pop().unwrap(), Some(RxReturn { token: 3 }));
    assert!(!k.to_engine.notify().unwrap(), "disarmed: no more rings");
    // Futex sleepers read the sequence word before arming; a ring bumps it.
    let seq = e.wait.futex_seq();
    e.wait.arm(lu2k_ring_abi::doorbell::WAKE_FUTEX);
    assert!(k.to_engine.notify().unwrap());
    assert_eq!(e.wait.futex_seq(), seq.wrapping_add(1));
    e.wait.disarm();
}
